"""Rewards: one registry of reward terms and ONE pure function, `combine`, that turns scores into rewards.

Everything that reads a reward goes through `combine(reward_cfg, RewardInputs) -> (rewards, metrics)`: both
training paths (the host path, `compute_rewards`, for verifiers that re-read text with their own tokenizer or
are served by an inference server, and the device path, `device_reward_fn`, inside the trainer's single
jitted step), `score`, `audit`, `evaluate` and the held-out evaluation. Callers only gather the inputs:
per-verifier scores in both CME forms, the policy's own statistics, lengths, stop flags and the guards' inputs.

A reward is a weighted sum of named terms (`RewardConfig.terms`), each one function in `REGISTRY`: `cme`,
the weighted sum of the verifiers' mean response log-probs (contrastive: minus the same response's mean
log-prob after an empty prompt); the policy-side baselines `self_certainty` (Intuitor: mean KL(uniform || p)
over the response), `neg_entropy` (RENT, EM-RL token level), `self_loglik` (EM-RL sequence level); `length`
and `random` (uniform in [0, 1)). A new label-free signal is one `@register`ed function here. With `zscore`
every component is standardised inside each prompt's group before weighting; the guards (n-gram repetition
and length penalties) are subtracted after that, and empty responses get `empty_reward`. Non-finite scores
never reach an advantage: `combine` zeroes them and counts them, and `check_nonfinite` turns the count into
one error naming the source and the row, on both paths.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cme_jax.distributed import from_process_0
from cme_jax.errors import CmeError
from cme_jax.models.logprobs import DEFAULT_CHUNK_ELEMENTS, token_stats
from cme_jax.models.transformer import Array, ModelConfig, Weights
from cme_jax.scoring import (
    DEFAULT_BLOCK_TOKENS,
    Verifier,
    VerifierConfig,
    hidden_token_ids,
    join_prompts,
    load_verifier,
    plain_verifier,
    score_same_vocab,
    score_same_vocab_jit,
    score_unique,
    visible_response,
)
from cme_jax.tokens import bucket_length, left_pad

# Group spreads this small are float noise in equal rewards, not a signal to blow up by the std division.
ZERO_SPREAD_TOL = 1e-12
CME_FORMS = ("plain", "contrastive")


# ----------------------------------------------------------------------------------------------------------
# Pure array pieces (jittable)


def response_lengths(response_mask_RxN: Array, stopped_R: Array) -> Array:
    """Response tokens per row without the final stop token."""
    m = jnp.asarray(response_mask_RxN).astype(jnp.int32).sum(axis=1)
    return m - jnp.asarray(stopped_R).astype(jnp.int32)


def content_mask(response_mask_RxN: Array, stopped_R: Array) -> Array:
    """The response mask without the final stop token."""
    N = response_mask_RxN.shape[1]
    return jnp.arange(N)[None, :] < response_lengths(response_mask_RxN, stopped_R)[:, None]


def _ngrams(tokens_RxN: Array, mask_RxN: Array, n: int) -> tuple[Array, Array]:
    """All n-grams [R, M, n] of each row (M = N - n + 1) and whether each lies inside the mask."""
    M = tokens_RxN.shape[1] - n + 1
    mask_RxN = jnp.asarray(mask_RxN).astype(bool)
    grams = jnp.stack([tokens_RxN[:, i : i + M] for i in range(n)], axis=-1)
    ok = jnp.stack([mask_RxN[:, i : i + M] for i in range(n)], axis=-1).all(axis=-1)
    return grams, ok


def _distinct_count(grams_Mxn: Array, ok_M: Array) -> tuple[Array, Array]:
    """Exact (distinct, total) count of the valid n-grams: sort them (valid first), count changes."""
    n = grams_Mxn.shape[1]
    order = jnp.lexsort([grams_Mxn[:, j] for j in reversed(range(n))] + [~ok_M])
    g, o = grams_Mxn[order], ok_M[order]
    new = jnp.concatenate([jnp.ones((1,), bool), jnp.any(g[1:] != g[:-1], axis=1)])
    return (new & o).sum(), o.sum()


def ngram_repetition(tokens_RxN: Array, mask_RxN: Array, n: int) -> Array:
    """Fraction of each row's n-grams that repeat an earlier one: 1 - distinct / total (0 without n-grams)."""
    R, N = tokens_RxN.shape
    if N - n + 1 <= 0:
        return jnp.zeros((R,), jnp.float32)
    grams, ok = _ngrams(jnp.asarray(tokens_RxN), mask_RxN, n)
    distinct, total = jax.vmap(_distinct_count)(grams, ok)
    return jnp.where(total > 0, 1.0 - distinct / jnp.maximum(total, 1), 0.0).astype(jnp.float32)


def distinct_ngrams(tokens_RxN: Array, mask_RxN: Array, n: int = 2) -> Array:
    """Distinct n-grams over all n-grams of the batch (corpus level, n-grams inside rows); 0 when there are none."""
    if tokens_RxN.shape[1] - n + 1 <= 0:
        return jnp.zeros((), jnp.float32)
    grams, ok = _ngrams(jnp.asarray(tokens_RxN), mask_RxN, n)
    distinct, total = _distinct_count(grams.reshape(-1, n), ok.reshape(-1))
    return jnp.where(total > 0, distinct / jnp.maximum(total, 1), 0.0).astype(jnp.float32)


def distinct_n(token_lists: Sequence[Sequence[int]], n: int = 2) -> float:
    """Host version of `distinct_ngrams` over lists of ids."""
    seen: set[tuple[int, ...]] = set()
    total = 0
    for t in token_lists:
        for i in range(len(t) - n + 1):
            seen.add(tuple(t[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def zscore_groups(x_R: Array, valid_R: Array, group_size: int, eps: float = 1e-6) -> Array:
    """(x - group mean) / (group std + eps) over each group's valid rows (population std); 0 elsewhere.

    Groups whose valid values are all equal give 0, as do rows that are not valid.
    """
    x = jnp.asarray(x_R, jnp.float32).reshape(-1, group_size)
    v = jnp.asarray(valid_R, bool).reshape(-1, group_size)
    vf = v.astype(jnp.float32)
    xv = jnp.where(v, x, 0.0)
    n = jnp.maximum(vf.sum(axis=1, keepdims=True), 1.0)
    mean = xv.sum(axis=1, keepdims=True) / n
    std = jnp.sqrt((vf * (xv - mean) ** 2).sum(axis=1, keepdims=True) / n)
    spread = jnp.where(v, x, -jnp.inf).max(axis=1, keepdims=True) - jnp.where(v, x, jnp.inf).min(axis=1, keepdims=True)
    z = jnp.where(spread > ZERO_SPREAD_TOL, (x - mean) / (std + eps), 0.0)
    return jnp.where(v, z, 0.0).reshape(-1)


def combine_rewards(
    components: Mapping[str, Array],
    weights: Mapping[str, float],
    valid_R: Array,
    group_size: int,
    *,
    zscore: bool = False,
    eps: float = 1e-6,
) -> Array:
    """sum_k weights[k] * components[k] (each z-scored inside its group first when zscore); 0 at invalid rows."""
    total = jnp.zeros(jnp.shape(valid_R), jnp.float32)
    for k, w in weights.items():
        x = jnp.asarray(components[k], jnp.float32)
        if zscore:
            x = zscore_groups(x, valid_R, group_size, eps)
        total = total + w * jnp.where(valid_R, x, 0.0)
    return total


# ----------------------------------------------------------------------------------------------------------
# What a reward is computed from


@struct.dataclass
class VerifierForms:
    """One verifier's scores of R responses: the mean log-prob after the prompt's context (`plain`) and after
    the empty prompt's context (`bare`, None when not scored); contrastive CME is plain - bare."""

    plain: Array  # [R] float32
    count: Array  # [R] scored tokens (end token included)
    empty: Array  # [R] bool: nothing to score
    truncated: Array  # [R] bool: cut to the verifier's max_length
    bare: Array | None = None  # [R] float32

    def form(self, contrastive: bool, name: str) -> Array:
        if not contrastive:
            return self.plain
        if self.bare is None:
            raise ValueError(f"verifier {name!r} is contrastive but its empty-prompt scores were not computed")
        return self.plain - self.bare


@struct.dataclass
class RewardInputs:
    """Everything a reward term, a guard or a diagnostic reads, for R responses in group-major order.

    Fields a caller cannot know (text without the policy's ids, a reward without a policy forward) are None;
    the terms that need them fail with one line.
    """

    empty: Array  # [R] bool: responses with nothing in them
    verifiers: dict[str, VerifierForms] = struct.field(default_factory=dict)
    policy: dict[str, Array] = struct.field(default_factory=dict)  # policy_response_stats, those the terms read
    truncated: Array | None = None  # [R] bool: cut at the generation limit
    lengths: Array | None = None  # [R] response tokens without the stop token
    repetition: Array | None = None  # [R] share of repeated n-grams (RewardConfig.repetition_ngram)
    tokens: Array | None = None  # [R, N] the policy's response ids
    content: Array | None = None  # [R, N] their mask without the stop token
    rng: Array | None = None  # key of the random term
    group_size: int = struct.field(pytree_node=False, default=1)

    @property
    def rows(self) -> int:
        return int(self.empty.shape[0])


# ----------------------------------------------------------------------------------------------------------
# The registry of reward terms


# term(reward_cfg, inputs) -> [R] values, or {component: ([R] values, weight inside the term)}.
TermFn = Callable[["RewardConfig", RewardInputs], Any]


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """A registered reward term and what it reads besides the verifier scores."""

    fn: TermFn
    policy_stats: tuple[str, ...] = ()  # keys of policy_response_stats it needs (one policy forward)
    needs_tokens: bool = False  # needs the policy's response ids (lengths, repetition)


REGISTRY: dict[str, TermSpec] = {}


def register(name: str, *, policy_stats: Sequence[str] = (), needs_tokens: bool = False) -> Callable[[TermFn], TermFn]:
    """Register a reward term under `name`; every command and both training paths then accept it."""

    def add(fn: TermFn) -> TermFn:
        REGISTRY[name] = TermSpec(fn, tuple(policy_stats), needs_tokens)
        return fn

    return add


@register("cme")
def cme_term(rcfg: RewardConfig, x: RewardInputs) -> dict[str, tuple[Array, float]]:
    """One component per verifier, `cme/<name>`, in its configured form and weighted by its weight."""
    out = {}
    term_weight = next(t.weight for t in rcfg.terms if t.name == "cme")
    for vc in rcfg.verifiers:
        forms = x.verifiers.get(vc.name)
        if forms is None:
            if term_weight * vc.weight == 0:
                continue  # a monitor, not scored for the reward
            raise ValueError(f"reward inputs hold no scores of verifier {vc.name!r}")
        out[f"cme/{vc.name}"] = (forms.form(vc.contrastive, vc.name), vc.weight)
    return out


def _policy_stat(name: str) -> TermFn:
    def term(rcfg: RewardConfig, x: RewardInputs) -> Array:
        if name not in x.policy:
            raise CmeError(f"reward {name!r} needs the policy model and its prompt and response ids")
        return x.policy[name]

    return term


for _name in ("self_certainty", "neg_entropy", "self_loglik"):
    register(_name, policy_stats=(_name,))(_policy_stat(_name))


@register("length", needs_tokens=True)
def length_term(rcfg: RewardConfig, x: RewardInputs) -> Array:
    if x.lengths is None:
        raise CmeError("reward 'length' needs the policy's response ids")
    return jnp.asarray(x.lengths).astype(jnp.float32)


@register("random", needs_tokens=True)
def random_term(rcfg: RewardConfig, x: RewardInputs) -> Array:
    """Uniform in [0, 1): a reward that carries no information (a control)."""
    if x.rng is None:
        raise ValueError("reward 'random' needs an rng key")
    return jax.random.uniform(x.rng, (x.rows,))


# ----------------------------------------------------------------------------------------------------------
# Config


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One named reward and its weight in the sum."""

    name: str  # a key of REGISTRY
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in REGISTRY:
            allowed = ", ".join(map(repr, REGISTRY))
            raise ValueError(f"reward term {self.name!r} is not allowed; choose one of {allowed}")
        if not _number(self.weight):
            raise ValueError(f"reward term {self.name!r}: weight={self.weight!r} must be a finite number")


def _as_term(x: Any) -> RewardTerm:
    if isinstance(x, RewardTerm):
        return x
    if isinstance(x, str):
        return RewardTerm(x)  # type: ignore[arg-type]
    if isinstance(x, list | tuple) and len(x) == 2:
        return RewardTerm(x[0], x[1])
    if isinstance(x, Mapping):
        unknown = set(x) - {"name", "weight"}
        if unknown or "name" not in x:
            raise ValueError(f"reward.terms entry {dict(x)!r} needs 'name' and optionally 'weight', nothing else")
        return RewardTerm(x["name"], x.get("weight", 1.0))
    raise ValueError(f"reward.terms entry {x!r} must be a name, a [name, weight] pair or {{name, weight}}")


def _as_verifier(x: Any, i: int) -> VerifierConfig:
    if isinstance(x, VerifierConfig):
        return x
    if isinstance(x, str):
        return VerifierConfig(model=x)
    if isinstance(x, Mapping):
        fields = [f.name for f in dataclasses.fields(VerifierConfig)]
        unknown = sorted(set(x) - set(fields))
        if unknown:
            raise ValueError(f"reward.verifiers[{i}] has unknown key {unknown[0]!r}; allowed: {', '.join(fields)}")
        if "model" not in x:
            raise ValueError(f"reward.verifiers[{i}] needs a 'model' (Hub id, directory, .gguf or embedded alias)")
        return VerifierConfig(**x)
    raise ValueError(f"reward.verifiers[{i}]={x!r} must be a model spec or a mapping of verifier settings")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Which rewards, their weights, the verifiers, z-scoring, the empty-response floor and the guards.

    The default (`cme` with no verifiers) is a valid schema default; using it fails until verifiers are set.
    """

    terms: tuple[RewardTerm, ...] = (RewardTerm("cme"),)
    verifiers: tuple[VerifierConfig, ...] = ()
    zscore: bool = False  # standardise each component (each verifier, each other term) inside its group
    zscore_eps: float = 1e-6
    empty_reward: float = -10.0  # the whole reward of an empty response (below any plausible mean log-prob)
    repetition_penalty: float = 0.0  # minus this times the fraction of repeated n-grams; 0 = off
    repetition_ngram: int = 4
    length_penalty: float = 0.0  # minus this per response token beyond length_penalty_start; 0 = off
    length_penalty_start: int = 0

    def __post_init__(self) -> None:
        """Normalise lists (YAML) to tuples and validate, one line per problem."""
        terms = self.terms if isinstance(self.terms, list | tuple) else [self.terms]
        object.__setattr__(self, "terms", tuple(_as_term(t) for t in terms))
        verifiers = self.verifiers if isinstance(self.verifiers, list | tuple) else [self.verifiers]
        object.__setattr__(self, "verifiers", tuple(_as_verifier(v, i) for i, v in enumerate(verifiers)))
        names = [t.name for t in self.terms]
        if not names:
            raise ValueError("reward.terms is empty; give at least one term, e.g. [cme]")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"reward.terms lists {sorted(dup)[0]!r} twice; give each term once with its weight")
        if self.verifiers and "cme" not in names:
            raise ValueError("reward.verifiers are set but no 'cme' term uses them; add cme to reward.terms")
        vnames = [v.name for v in self.verifiers]
        dup = {n for n in vnames if vnames.count(n) > 1}
        if dup:
            raise ValueError(f"two verifiers are named {sorted(dup)[0]!r}; give them distinct 'name's")
        if not isinstance(self.zscore, bool):
            raise ValueError(f"reward.zscore={self.zscore!r} must be true or false")
        for field in ("zscore_eps", "repetition_penalty", "length_penalty"):
            v = getattr(self, field)
            if not _number(v) or v < 0:
                raise ValueError(f"reward.{field}={v!r} must be a number >= 0")
        if not _number(self.empty_reward):
            raise ValueError(f"reward.empty_reward={self.empty_reward!r} must be a finite number")
        for field, low in (("repetition_ngram", 1), ("length_penalty_start", 0)):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"reward.{field}={v!r} must be an integer >= {low}")

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @property
    def needs_policy_tokens(self) -> bool:
        """Whether a term or guard needs the policy's own tokens (and, for some, its forward)."""
        guards = self.repetition_penalty > 0 or self.length_penalty > 0
        return guards or any(REGISTRY[n].needs_tokens or REGISTRY[n].policy_stats for n in self.term_names)

    @property
    def policy_stats(self) -> tuple[str, ...]:
        """The policy statistics (`policy_response_stats` keys) the terms read."""
        return tuple(dict.fromkeys(s for n in self.term_names for s in REGISTRY[n].policy_stats))


def reward_config_from_dict(d: Mapping[str, Any]) -> RewardConfig:
    """A RewardConfig from a YAML mapping; unknown keys fail with one line."""
    if not isinstance(d, Mapping):
        raise ValueError(f"reward config must be a mapping, got {type(d).__name__}")
    fields = [f.name for f in dataclasses.fields(RewardConfig)]
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"reward has unknown key {unknown[0]!r}; allowed: {', '.join(fields)}")
    return RewardConfig(**d)


def with_form(rcfg: RewardConfig, form: str) -> RewardConfig:
    """The same reward with every verifier read in one CME form ("plain" or "contrastive")."""
    if form not in CME_FORMS:
        raise ValueError(f"CME form {form!r} is not one of {CME_FORMS}")
    vs = tuple(dataclasses.replace(v, contrastive=form == "contrastive") for v in rcfg.verifiers)
    return dataclasses.replace(rcfg, verifiers=vs)


def cme_config(verifiers: Sequence[VerifierConfig], **kw: Any) -> RewardConfig:
    """A reward of the one term `cme` over these verifiers (what score, audit and evaluate combine)."""
    return RewardConfig(terms=(RewardTerm("cme"),), verifiers=tuple(verifiers), **kw)


# ----------------------------------------------------------------------------------------------------------
# The one combination


@struct.dataclass
class RewardParts:
    """`combine`'s result with what it was made of: components before weighting and the empty rows."""

    rewards: Array  # [R] float32
    components: dict[str, Array]
    empty: Array  # [R] bool
    metrics: dict[str, Array]


def combine_parts(rcfg: RewardConfig, x: RewardInputs) -> RewardParts:
    """Rewards of R responses: the registered terms, weighted (z-scored per group first with zscore), minus the
    guards, with empty responses at `empty_reward`; non-finite scores are zeroed and counted (pure, jittable)."""
    empty = jnp.asarray(x.empty, bool)
    for forms in x.verifiers.values():
        empty = empty | jnp.asarray(forms.empty, bool)
    valid = ~empty
    components: dict[str, Array] = {}
    weights: dict[str, float] = {}
    for term in rcfg.terms:
        out = REGISTRY[term.name].fn(rcfg, x)
        if not isinstance(out, Mapping):
            out = {term.name: (out, 1.0)}
        for key, (values, w) in out.items():
            components[key] = jnp.asarray(values, jnp.float32)
            weights[key] = term.weight * w
    metrics: dict[str, Array] = {}
    n_bad = jnp.zeros((), jnp.int32)
    for key, values in components.items():
        bad = valid & ~jnp.isfinite(values)
        n = bad.sum()
        metrics[f"{key}/nonfinite"] = n.astype(jnp.float32)
        metrics[f"{key}/nonfinite_row"] = jnp.where(n > 0, jnp.argmax(bad), -1).astype(jnp.float32)
        components[key] = jnp.where(bad, 0.0, values)
        n_bad = n_bad + n
    metrics["reward/nonfinite"] = n_bad.astype(jnp.float32)
    total = combine_rewards(components, weights, valid, x.group_size, zscore=rcfg.zscore, eps=rcfg.zscore_eps)
    if rcfg.repetition_penalty > 0 and x.repetition is not None:
        total = total - rcfg.repetition_penalty * jnp.asarray(x.repetition, jnp.float32)
    if rcfg.length_penalty > 0 and x.lengths is not None:
        over = jnp.maximum(jnp.asarray(x.lengths) - rcfg.length_penalty_start, 0).astype(jnp.float32)
        total = total - rcfg.length_penalty * over
    rewards = jnp.where(empty, jnp.float32(rcfg.empty_reward), total).astype(jnp.float32)
    metrics.update(reward_metrics(rcfg, rewards, components, empty, x))
    return RewardParts(rewards, components, empty, metrics)


def combine(rcfg: RewardConfig, x: RewardInputs) -> tuple[Array, dict[str, Array]]:
    """Rewards [R] float32 and per-step metrics from the inputs, under `rcfg` (pure, jittable)."""
    parts = combine_parts(rcfg, x)
    return parts.rewards, parts.metrics


combine_parts_jit = jax.jit(combine_parts, static_argnums=0)


def check_nonfinite(metrics: Mapping[str, Any], group_size: int = 1) -> dict[str, Any]:
    """Raise one CmeError naming the source and the row when `combine` counted non-finite scores; otherwise
    the metrics without the row markers (both training paths, score, audit and evaluate call this)."""
    for key, value in metrics.items():
        if not key.endswith("/nonfinite") or key == "reward/nonfinite" or not float(np.asarray(value)) > 0:
            continue
        comp = key.removesuffix("/nonfinite")
        what = f"verifier {comp[4:]!r}" if comp.startswith("cme/") else f"reward {comp!r}"
        row = int(float(np.asarray(metrics[f"{comp}/nonfinite_row"])))
        where = (
            f"row {row}" if group_size == 1 else f"row {row}: prompt {row // group_size}, response {row % group_size}"
        )
        raise CmeError(
            f"{what} gave {int(float(np.asarray(value)))} non-finite score(s) (first at {where}); no update uses "
            "them; run it in float32 (dtype: float32) or check the model"
        )
    return {k: v for k, v in metrics.items() if not k.endswith("/nonfinite_row")}


def _mean_std(x_R: Array, valid_R: Array) -> tuple[Array, Array]:
    """Mean and population std over the valid rows (0, 0 when none is valid)."""
    x = jnp.asarray(x_R, jnp.float32)
    v = jnp.asarray(valid_R, bool)
    n = jnp.maximum(v.sum(), 1).astype(jnp.float32)
    mean = jnp.where(v, x, 0.0).sum() / n
    std = jnp.sqrt(jnp.where(v, (x - mean) ** 2, 0.0).sum() / n)
    return mean, std


def reward_metrics(
    rcfg: RewardConfig, rewards_R: Array, components: Mapping[str, Array], empty_R: Array, x: RewardInputs
) -> dict[str, Array]:
    """Per-step diagnostics as float32 scalars (the same names on the host and on device).

    reward/mean|std; <component>/mean|std over non-empty rows (components are cme/<verifier>, the baselines,
    length, random); response/empty and response/truncated (counts); cme/<verifier>/truncated (responses cut
    to the verifier's max_length); with the policy's ids also response/length_mean, response/repetition_<n>
    and response/distinct_2.
    """
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    empty_R = jnp.asarray(empty_R, bool)
    valid = ~empty_R
    out = {"reward/mean": f32(jnp.mean(rewards_R)), "reward/std": f32(jnp.std(rewards_R))}
    out["response/empty"] = f32(empty_R.sum())
    if x.truncated is not None:
        out["response/truncated"] = f32(jnp.asarray(x.truncated, bool).sum())
    for k, v in components.items():
        out[f"{k}/mean"], out[f"{k}/std"] = _mean_std(v, valid)
    for name, forms in x.verifiers.items():
        out[f"cme/{name}/truncated"] = f32(jnp.asarray(forms.truncated, bool).sum())
    if x.lengths is not None:
        out["response/length_mean"] = f32(jnp.mean(jnp.asarray(x.lengths, jnp.float32)))
    if x.repetition is not None:
        out[f"response/repetition_{rcfg.repetition_ngram}"] = f32(jnp.mean(x.repetition))
    if x.tokens is not None and x.content is not None:
        out["response/distinct_2"] = distinct_ngrams(x.tokens, x.content, 2)
    return out


def policy_response_stats(
    weights: Weights,
    cfg: ModelConfig,
    tokens_RxT: Array,
    mask_RxT: Array,
    *,
    start: int,
    entropy: bool = True,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, Array]:
    """Per-row means over the response tokens (columns >= start, stop token included) of the policy's stats.

    `self_loglik`: mean log p(token); with entropy also `neg_entropy`: -mean H(p_t) and `self_certainty`:
    mean KL(U || p_t) = -log V - mean_v log p_t(v). One forward; the vocabulary head only at the response.
    """
    stats = token_stats(weights, cfg, tokens_RxT, mask_RxT, start=start, entropy=entropy, chunk_budget=chunk_budget)
    n = jnp.asarray(mask_RxT)[:, start:].astype(jnp.float32).sum(axis=1)
    denom = jnp.maximum(n, 1.0)
    out = {"self_loglik": stats["logp"].sum(axis=1) / denom}
    if entropy:
        out["neg_entropy"] = -stats["entropy"].sum(axis=1) / denom
        kl = -math.log(cfg.vocab_size) * n - stats["mean_logp"].sum(axis=1)
        out["self_certainty"] = kl / denom
    return out


policy_response_stats_jit = jax.jit(policy_response_stats, static_argnames=("cfg", "start", "entropy", "chunk_budget"))


def response_inputs(tokens_RxN: Array, mask_RxN: Array, stopped_R: Array, ngram: int) -> dict[str, Array]:
    """The policy-side inputs of a reward from the policy's response ids: lengths, content mask, repetition."""
    lengths = response_lengths(mask_RxN, stopped_R)
    content = content_mask(mask_RxN, stopped_R)
    return {
        "lengths": lengths,
        "content": content,
        "repetition": ngram_repetition(jnp.asarray(tokens_RxN), content, ngram),
    }


response_inputs_jit = jax.jit(response_inputs, static_argnames="ngram")


def _check_setup(rcfg: RewardConfig, verifiers: Sequence[Any], group_size: int) -> None:
    """The checks that need the loaded verifiers and the group size (every entry point)."""
    if "cme" in rcfg.term_names and not rcfg.verifiers:
        raise CmeError("reward term 'cme' needs reward.verifiers; add at least one verifier model")
    if [v.name for v in verifiers] != [v.name for v in rcfg.verifiers]:
        raise ValueError("verifiers must be loaded from rcfg.verifiers, in the same order")
    if rcfg.zscore and group_size < 2:
        raise CmeError("reward.zscore needs groups of at least 2 responses per prompt (sampling.num_samples >= 2)")


# ----------------------------------------------------------------------------------------------------------
# Verifier scores of text (any tokenizer): training's host path, score, audit and evaluate


def text_forms(
    verifier: Verifier,
    prompts_R: Sequence[str],
    texts_R: Sequence[str],
    stopped_R: Sequence[bool] | np.ndarray | None = None,
    *,
    both: bool = False,
    cache: Any = None,
    progress: bool = False,
    **kw: Any,
) -> VerifierForms:
    """A verifier's scores of each (prompt, text) row after the prompt's context and, when contrastive or
    `both`, after the empty prompt's context; distinct rows are scored once, rows in `cache` never."""
    from tqdm import tqdm

    plain = plain_verifier(verifier)
    R = len(texts_R)
    stopped = [True] * R if stopped_R is None else [bool(x) for x in stopped_R]
    passes = [("plain", list(prompts_R))]
    if both or verifier.config.contrastive:
        passes.append(("empty prompt", [""] * R))
    out = {}
    for label, prompts in passes:
        n = len(set(zip(prompts, texts_R, stopped)))
        desc = f"cme {verifier.name}" + ("" if label == "plain" else f" ({label})")
        with tqdm(total=n, desc=desc, unit="text", file=sys.stderr, disable=not progress) as bar:
            out[label] = score_unique(plain, prompts, texts_R, stopped, cache=cache, progress=bar, **kw)
    s = out["plain"]
    bare = out["empty prompt"].mean if "empty prompt" in out else None
    return VerifierForms(plain=s.mean, count=s.count, empty=s.empty, truncated=s.truncated, bare=bare)


def text_inputs(
    verifiers: Sequence[Verifier | VerifierConfig],
    prompts_R: Sequence[str],
    texts_R: Sequence[str],
    stopped_R: Sequence[bool] | np.ndarray | None = None,
    *,
    group_size: int = 1,
    both_forms: bool = False,
    mesh: Any = None,
    say: Callable[[str], None] | None = None,
    **kw: Any,
) -> RewardInputs:
    """RewardInputs of texts without the policy's ids (score, audit, evaluate): each verifier's forms, loaded
    one at a time when given as a config and released after scoring."""
    forms = {}
    for v in verifiers:
        verifier = load_verifier(v, mesh=mesh) if isinstance(v, VerifierConfig) else v
        if say is not None:
            say(f"scoring {len(texts_R)} texts with verifier {verifier.name} ({verifier.config.model})")
        forms[verifier.name] = text_forms(verifier, prompts_R, texts_R, stopped_R, both=both_forms, mesh=mesh, **kw)
        del verifier
    empty = np.array([not t for t in texts_R], bool)
    return RewardInputs(empty=empty, verifiers=forms, group_size=group_size)


def combine_host(rcfg: RewardConfig, x: RewardInputs) -> RewardParts:
    """`combine` on host inputs (jitted once per shape), its arrays back as numpy, non-finite scores raised."""
    parts = jax.device_get(combine_parts_jit(rcfg, x))
    metrics = check_nonfinite(parts.metrics, x.group_size)
    return RewardParts(
        np.asarray(parts.rewards),
        {k: np.asarray(v) for k, v in parts.components.items()},
        np.asarray(parts.empty),
        {k: float(v) for k, v in metrics.items()},
    )


# ----------------------------------------------------------------------------------------------------------
# Host side: one training step's batch


@dataclasses.dataclass
class RewardBatch:
    """One step's responses: P prompts and R = P * G responses in group-major order.

    The policy's ids (`response_tokens` [R, N] with the stop token last when stopped, `prompt_tokens`
    [P, C] left-padded) are needed by the policy baselines, the guards and the same-vocabulary fast path.
    """

    prompts: Sequence[str]
    responses: Sequence[str]
    stopped: np.ndarray | None = None  # [R] ended on a stop token; default all True
    truncated: np.ndarray | None = None  # [R] hit the generation limit
    response_tokens: Any = None
    response_mask: Any = None
    prompt_tokens: Any = None
    prompt_mask: Any = None

    def __post_init__(self) -> None:
        P, R = len(self.prompts), len(self.responses)
        if P == 0 or R % P:
            raise ValueError(f"{R} responses do not split into groups for {P} prompts")
        self.stopped = np.ones(R, bool) if self.stopped is None else np.asarray(self.stopped, bool)
        if self.response_tokens is not None and np.shape(self.response_tokens)[0] != R:
            raise ValueError(f"response_tokens has {np.shape(self.response_tokens)[0]} rows for {R} responses")

    @property
    def group_size(self) -> int:
        return len(self.responses) // len(self.prompts)

    @property
    def has_tokens(self) -> bool:
        return self.response_tokens is not None and self.response_mask is not None

    @classmethod
    def from_rollout(
        cls, prompts: Sequence[str], rollout: Any, prompt_tokens: Any, prompt_mask: Any, tokenizer: Any
    ) -> RewardBatch:
        """From a sampling.Rollout and the left-padded prompt ids it was sampled from."""
        from cme_jax.sampling import decode_responses

        return cls(
            prompts=list(prompts),
            responses=decode_responses(tokenizer, rollout),
            stopped=np.asarray(rollout.stopped),
            truncated=np.asarray(rollout.truncated),
            response_tokens=rollout.tokens,
            response_mask=rollout.mask,
            prompt_tokens=prompt_tokens,
            prompt_mask=prompt_mask,
        )

    def row_prompts(self) -> list[str]:
        G = self.group_size
        return [p for p in self.prompts for _ in range(G)]


@dataclasses.dataclass
class RewardOutput:
    """Rewards [R], every component before weighting, the empty rows, a flat dict of diagnostics and timings."""

    rewards: np.ndarray
    components: dict[str, np.ndarray]
    empty: np.ndarray
    diagnostics: dict[str, float]
    # time/score_remote: the served verifiers' time from their first request to their last reply
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def verifier_contexts(verifier: Verifier, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The verifier's context ids of each prompt, left-padded to a length bucket: int32 [P, C] and mask."""
    ctx = [verifier.context_ids(p) for p in prompts]
    return left_pad(ctx, bucket_length(max(map(len, ctx))), verifier.pad)


def _fast_forms(verifier: Verifier, batch: RewardBatch, chunk_budget: int) -> VerifierForms:
    """Scores from the policy's ids on device, for a verifier that shares the policy's vocabulary."""
    vc = verifier.config
    kw = dict(
        end_id=verifier.end_id if verifier.end_id is not None else 0,
        score_eos=vc.score_eos,
        max_length=vc.max_length,
        pad_id=verifier.pad,
        hidden_ids_K=verifier.hidden_ids,
        chunk_budget=chunk_budget,
    )
    weights, cfg = verifier.model.weights, verifier.model.cfg
    args = (batch.response_tokens, batch.response_mask, batch.stopped)

    def run(prompts: Sequence[str]) -> dict[str, np.ndarray]:
        toks, mask = verifier_contexts(verifier, prompts)
        return {k: np.asarray(v) for k, v in score_same_vocab_jit(weights, cfg, toks, mask, *args, **kw).items()}

    out = run(batch.prompts)
    bare = run([""])["mean"] if vc.contrastive else None
    return VerifierForms(out["mean"], out["count"], out["empty"], out["truncated"], bare)


def _policy_stats(batch: RewardBatch, policy: Any, names: Sequence[str], chunk_budget: int) -> dict[str, np.ndarray]:
    if policy is None or batch.prompt_tokens is None or not batch.has_tokens:
        raise CmeError(f"reward {names[0]!r} needs the policy model and its prompt and response ids")
    tokens, mask = join_prompts(batch.prompt_tokens, batch.prompt_mask, batch.response_tokens, batch.response_mask)
    start = int(np.shape(batch.prompt_tokens)[1])
    entropy = any(n != "self_loglik" for n in names)
    out = policy_response_stats_jit(
        policy.weights, policy.cfg, tokens, mask, start=start, entropy=entropy, chunk_budget=chunk_budget
    )
    return {k: np.asarray(v) for k, v in out.items() if k in names}


def compute_rewards(
    rcfg: RewardConfig,
    batch: RewardBatch,
    *,
    verifiers: Sequence[Verifier] = (),
    policy: Any = None,
    rng: Array | None = None,
    batch_size: int | None = None,
    mesh: Any = None,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
    skip_unweighted: bool = False,
) -> RewardOutput:
    """Rewards of one step's responses under `rcfg`, on the host (any verifier tokenizer), through `combine`.

    `verifiers` are loaded in the order of rcfg.verifiers. `policy` (anything with .weights, .cfg and
    .tokenizer, e.g. a LoadedModel) is needed by the policy baselines and enables the same-vocabulary fast
    path. `rng` is needed by the random reward. With `skip_unweighted`, verifiers whose total weight is 0
    (monitors, which the trainer's held-out evaluation scores) are not scored: they cannot change a reward.
    Non-finite scores raise CmeError naming the source and the row.
    """
    G = batch.group_size
    _check_setup(rcfg, verifiers, G)
    if rcfg.needs_policy_tokens and not batch.has_tokens:
        raise CmeError("the policy baselines and the guards need the policy's response ids; only cme works on text")
    empty = np.array([not r for r in batch.responses], bool)
    side: dict[str, Any] = {}
    if batch.has_tokens:
        ids = (batch.response_tokens, batch.response_mask, np.asarray(batch.stopped))
        side = {k: np.asarray(v) for k, v in response_inputs_jit(*ids, ngram=rcfg.repetition_ngram).items()}
        side["tokens"] = np.asarray(batch.response_tokens)
        empty |= side["lengths"] <= 0
    forms: dict[str, VerifierForms] = {}
    timings: dict[str, float] = {}
    if "cme" in rcfg.term_names:
        cme_weight = next(t.weight for t in rcfg.terms if t.name == "cme")
        kw = dict(batch_size=batch_size, mesh=mesh, chunk_budget=chunk_budget)
        scored = [v for v in verifiers if not (skip_unweighted and cme_weight * v.config.weight == 0)]

        def forms_of(v: Verifier) -> VerifierForms:
            if policy is not None and batch.has_tokens and v.shares_vocabulary(policy.tokenizer):
                return _fast_forms(v, batch, chunk_budget)
            return text_forms(v, batch.row_prompts(), batch.responses, batch.stopped, **kw)

        def timed(v: Verifier) -> tuple[VerifierForms, float]:
            t0 = time.perf_counter()
            return forms_of(v), time.perf_counter() - t0

        served = [v for v in scored if v.remote is not None]
        # Every process holds every row; in a multi-process run process 0 alone asks the server, so each row is
        # sent once, and the others take its scores. Served verifiers wait on the network in threads while the
        # local ones run here.
        asking = served if jax.process_index() == 0 else []
        with ThreadPoolExecutor(max_workers=max(1, len(asking))) as pool:
            pending = {v.name: pool.submit(timed, v) for v in asking}
            local = {v.name: forms_of(v) for v in scored if v.remote is None}
            done = {name: f.result() for name, f in pending.items()}
        if jax.process_count() > 1:
            for v in served:  # the same collectives, in the same order, on every process
                got, seconds = done.get(v.name, (None, 0.0))
                done[v.name] = (_from_process_0(got, len(batch.responses), v.config.contrastive), seconds)
        forms = {v.name: done[v.name][0] if v.name in done else local[v.name] for v in scored}
        if served:
            timings["time/score_remote"] = max(t for _, t in done.values())
    stats = _policy_stats(batch, policy, rcfg.policy_stats, chunk_budget) if rcfg.policy_stats else {}
    x = RewardInputs(
        empty=empty,
        verifiers=forms,
        policy=stats,
        truncated=None if batch.truncated is None else np.asarray(batch.truncated, bool),
        rng=rng,
        group_size=G,
        **side,
    )
    parts = combine_host(rcfg, x)
    return RewardOutput(parts.rewards, parts.components, parts.empty, parts.metrics, timings)


def _from_process_0(forms: VerifierForms | None, rows: int, contrastive: bool) -> VerifierForms:
    """Process 0's scores of a served verifier on every process (a collective; the others pass None)."""
    zeros = lambda dtype: np.zeros(rows, dtype)
    if forms is None:
        forms = VerifierForms(zeros(np.float32), zeros(np.int32), zeros(bool), zeros(bool))
    sent = {
        "plain": np.asarray(forms.plain, np.float32),
        "count": np.asarray(forms.count, np.int32),
        "empty": np.asarray(forms.empty, np.int32),  # bools travel as integers through the broadcast's sum
        "truncated": np.asarray(forms.truncated, np.int32),
        "bare": zeros(np.float32) if forms.bare is None else np.asarray(forms.bare, np.float32),
    }
    got = from_process_0(sent)
    return VerifierForms(
        plain=got["plain"],
        count=got["count"],
        empty=got["empty"].astype(bool),
        truncated=got["truncated"].astype(bool),
        bare=got["bare"] if contrastive else None,
    )


# ----------------------------------------------------------------------------------------------------------
# Device side: the reward inside the trainer's single jitted step


@dataclasses.dataclass(frozen=True)
class _VerifierStatic:
    """What the device reward needs of a verifier besides its weights (closed over: Python constants)."""

    name: str
    cfg: ModelConfig
    end_id: int
    score_eos: bool
    max_length: int
    pad: int
    contrastive: bool


@dataclasses.dataclass
class DeviceReward:
    """The reward as a pure function of device arrays, for `train_step.fused_step`.

    `fn(policy_params, ro, prompts_R, pmask_R, frozen) -> (rewards_R float32, metrics)` is jittable; the
    frozen models and this step's verifier contexts come in through `frozen` (from `frozen(prompts, rng)`),
    placed by `frozen_shardings(mesh)`. Rewards equal `compute_rewards` on the same rollout (both call
    `combine`); `check` raises the host path's error when the metrics count non-finite scores (the fused
    step skips its update then).
    """

    fn: Callable[..., tuple[Array, dict[str, Array]]]
    rcfg: RewardConfig
    verifiers: tuple[Verifier, ...]
    hidden_ids: np.ndarray
    group_size: int

    def frozen(self, prompts: Sequence[str], rng: Array | None = None) -> dict[str, Any]:
        """This step's frozen inputs: per verifier its weights and context ids [P, C] (left-padded to a
        bucket; the empty prompt's [1, C'] too when contrastive), the hidden ids and the random reward's key."""
        vs = []
        for v in self.verifiers:
            ctx, ctx_mask = verifier_contexts(v, prompts)
            entry = {"weights": v.model.weights, "context": ctx, "context_mask": ctx_mask}
            if v.config.contrastive:
                entry["bare"], entry["bare_mask"] = verifier_contexts(v, [""])
            vs.append(entry)
        key = jax.random.key(0) if rng is None else rng
        if "random" in self.rcfg.term_names and rng is None:
            raise ValueError("reward 'random' needs an rng key")
        return {"verifiers": tuple(vs), "hidden_ids": self.hidden_ids, "rng": key}

    def frozen_shardings(self, mesh: Any) -> dict[str, Any]:
        """Shardings shaped like `frozen(...)`: weights by the rules, contexts by rows, the rest replicated."""
        from cme_jax.models.sharding import batch_sharding, replicated, weight_shardings

        rep, rows = replicated(mesh), batch_sharding(mesh, 2)
        vs = []
        for v in self.verifiers:
            entry = {"weights": weight_shardings(v.model.cfg, mesh), "context": rows, "context_mask": rows}
            if v.config.contrastive:
                entry["bare"], entry["bare_mask"] = rep, rep
            vs.append(entry)
        return {"verifiers": tuple(vs), "hidden_ids": rep, "rng": rep}

    def check(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The host path's CmeError when a step's metrics count non-finite scores; else the metrics to log."""
        return check_nonfinite(metrics, self.group_size)


def device_reward_fn(
    rcfg: RewardConfig,
    verifiers: Sequence[Verifier],
    policy_cfg: ModelConfig,
    policy_tokenizer: Any,
    group_size: int,
    *,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> DeviceReward | None:
    """The reward as one pure device function, or None when a verifier needs text (another vocabulary) or is
    served by an inference server (`compute_rewards` then scores on the host).

    The inputs `compute_rewards` gathers on the host are built on device from the policy's ids (verifier rows
    by `score_same_vocab`, special tokens dropped as decoding drops them; the baselines from one policy
    forward), then the same `combine` runs.
    """
    names = rcfg.term_names
    verifiers = tuple(verifiers) if "cme" in names else ()
    _check_setup(rcfg, verifiers, group_size)
    if not all(v.shares_vocabulary(policy_tokenizer) for v in verifiers):
        return None
    statics = tuple(
        _VerifierStatic(
            v.name,
            v.model.cfg,
            v.end_id if v.end_id is not None else 0,
            v.config.score_eos,
            v.config.max_length,
            v.pad,
            v.config.contrastive,
        )
        for v in verifiers
    )
    stat_names = rcfg.policy_stats
    G = group_size

    def fn(policy_params: Weights, ro: Any, prompts_R: Array, pmask_R: Array, frozen: Any):
        hidden = frozen["hidden_ids"]
        side = response_inputs(ro.tokens, ro.mask, ro.stopped, rcfg.repetition_ngram)
        _, visible = visible_response(ro.tokens, ro.mask, ro.stopped, hidden, 0)
        forms = {}
        for st, fz in zip(statics, frozen["verifiers"]):
            kw = dict(
                end_id=st.end_id,
                score_eos=st.score_eos,
                max_length=st.max_length,
                pad_id=st.pad,
                hidden_ids_K=hidden,
                chunk_budget=chunk_budget,
                block_tokens=block_tokens,
            )
            args = (ro.tokens, ro.mask, ro.stopped)
            with jax.named_scope(f"verifier_{st.name}"):
                out = score_same_vocab(fz["weights"], st.cfg, fz["context"], fz["context_mask"], *args, **kw)
                bare = None
                if st.contrastive:
                    bare = score_same_vocab(fz["weights"], st.cfg, fz["bare"], fz["bare_mask"], *args, **kw)["mean"]
            forms[st.name] = VerifierForms(out["mean"], out["count"], out["empty"], out["truncated"], bare)
        stats = {}
        if stat_names:
            tokens = jnp.concatenate([prompts_R, ro.tokens.astype(prompts_R.dtype)], axis=1)
            mask = jnp.concatenate([pmask_R.astype(bool), ro.mask.astype(bool)], axis=1)
            entropy = any(n != "self_loglik" for n in stat_names)
            out = policy_response_stats(
                policy_params,
                policy_cfg,
                tokens,
                mask,
                start=prompts_R.shape[1],
                entropy=entropy,
                chunk_budget=chunk_budget,
            )
            stats = {k: v for k, v in out.items() if k in stat_names}
        x = RewardInputs(
            empty=(side["lengths"] <= 0) | (visible <= 0),
            verifiers=forms,
            policy=stats,
            truncated=ro.truncated,
            tokens=ro.tokens,
            rng=frozen["rng"] if "random" in names else None,
            group_size=G,
            **side,
        )
        return combine(rcfg, x)

    return DeviceReward(fn, rcfg, tuple(verifiers), hidden_token_ids(policy_tokenizer), G)
