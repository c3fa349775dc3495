"""Reward registry: CME over one or more verifiers, the paper's baselines, guards and per-step diagnostics.

A reward is a weighted sum of named terms (`RewardConfig.terms`). `cme` is the weighted sum of the
verifiers' mean response log-probs (each optionally contrastive: minus the same response's mean log-prob
after an empty prompt); the baselines come from the policy's own forward over its responses:
`self_certainty` (Intuitor: mean over response tokens of KL(uniform || p)), `neg_entropy` (RENT, EM-RL
token level), `self_loglik` (EM-RL sequence level: the policy's mean token log-likelihood), `length`
(response tokens) and `random` (uniform in [0, 1)). With `zscore` every component is standardised inside
each prompt's group before weighting. Guards (n-gram repetition and length penalties) are subtracted after
that, and empty responses get `empty_reward`.

Two entry points share every step after scoring (`reward_components`, the one place that dispatches on
names, then `finish_rewards` and `reward_metrics`): `compute_rewards` on the host (any verifier, served
ones too; text is re-tokenized unless a verifier shares the policy's vocabulary), and `device_reward_fn`, a
pure function for the trainer's single jitted step when every verifier shares the policy's vocabulary and
runs here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from cme_jax.errors import CmeError
from cme_jax.models.logprobs import DEFAULT_CHUNK_ELEMENTS, token_stats
from cme_jax.models.transformer import Array, ModelConfig, Weights
from cme_jax.scoring import (
    DEFAULT_BLOCK_TOKENS,
    Verifier,
    VerifierConfig,
    VerifierScores,
    check_finite,
    hidden_token_ids,
    join_prompts,
    score_same_vocab,
    score_same_vocab_jit,
    score_texts,
    visible_response,
)
from cme_jax.tokens import bucket_length, left_pad

RewardName = Literal["cme", "self_certainty", "neg_entropy", "self_loglik", "length", "random"]
POLICY_TERMS = ("self_certainty", "neg_entropy", "self_loglik")
# Group spreads this small are float noise in equal rewards, not a signal to blow up by the std division.
ZERO_SPREAD_TOL = 1e-12


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One named reward and its weight in the sum."""

    name: RewardName
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in get_args(RewardName):
            allowed = ", ".join(map(repr, get_args(RewardName)))
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
        return any(n != "cme" for n in self.term_names) or self.repetition_penalty > 0 or self.length_penalty > 0


def reward_config_from_dict(d: Mapping[str, Any]) -> RewardConfig:
    """A RewardConfig from a YAML mapping; unknown keys fail with one line."""
    if not isinstance(d, Mapping):
        raise ValueError(f"reward config must be a mapping, got {type(d).__name__}")
    fields = [f.name for f in dataclasses.fields(RewardConfig)]
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"reward has unknown key {unknown[0]!r}; allowed: {', '.join(fields)}")
    return RewardConfig(**d)


def _check_setup(rcfg: RewardConfig, verifiers: Sequence[Verifier], group_size: int) -> None:
    """The checks that need the loaded verifiers and the group size (both entry points)."""
    if "cme" in rcfg.term_names and not rcfg.verifiers:
        raise CmeError("reward term 'cme' needs reward.verifiers; add at least one verifier model")
    if [v.name for v in verifiers] != [v.name for v in rcfg.verifiers]:
        raise ValueError("verifiers must be loaded from rcfg.verifiers, in the same order")
    if rcfg.zscore and group_size < 2:
        raise CmeError("reward.zscore needs groups of at least 2 responses per prompt (sampling.num_samples >= 2)")


# ----------------------------------------------------------------------------------------------------------
# Pure array pieces (jittable), shared by the host and device entry points


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


ngram_repetition_jit = jax.jit(ngram_repetition, static_argnames="n")


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


def reward_components(
    rcfg: RewardConfig,
    *,
    cme: Mapping[str, Array],
    verifier_weights: Mapping[str, float],
    policy: Mapping[str, Array],
    lengths_R: Array | None,
    random_R: Array | None,
) -> tuple[dict[str, Array], dict[str, float]]:
    """Every component in term order with its total weight: the one place that dispatches on reward names.

    `cme` maps verifier name -> mean log-prob [R] (contrastive already applied), `policy` holds the policy
    baselines that the terms use (see `policy_response_stats`).
    """
    term_w = {t.name: t.weight for t in rcfg.terms}
    components: dict[str, Array] = {}
    weights: dict[str, float] = {}
    for name in rcfg.term_names:
        if name == "cme":
            for v, w in verifier_weights.items():
                components[f"cme/{v}"] = cme[v]
                weights[f"cme/{v}"] = term_w["cme"] * w
            continue
        if name in POLICY_TERMS:
            components[name] = policy[name]
        elif name == "length":
            if lengths_R is None:
                raise CmeError("reward 'length' needs the policy's response ids")
            components[name] = jnp.asarray(lengths_R).astype(jnp.float32)
        elif name == "random":
            if random_R is None:
                raise ValueError("reward 'random' needs an rng key")
            components[name] = random_R
        else:  # pragma: no cover - RewardTerm validates names
            raise ValueError(f"unknown reward {name!r}")
        weights[name] = term_w[name]
    return components, weights


def finish_rewards(
    rcfg: RewardConfig,
    components: Mapping[str, Array],
    weights: Mapping[str, float],
    empty_R: Array,
    group_size: int,
    *,
    lengths_R: Array | None = None,
    repetition_R: Array | None = None,
) -> Array:
    """Weighted (optionally z-scored) sum, minus the guards, with empty responses at the floor: float32 [R]."""
    empty_R = jnp.asarray(empty_R, bool)
    total = combine_rewards(components, weights, ~empty_R, group_size, zscore=rcfg.zscore, eps=rcfg.zscore_eps)
    if rcfg.repetition_penalty > 0 and repetition_R is not None:
        total = total - rcfg.repetition_penalty * jnp.asarray(repetition_R, jnp.float32)
    if rcfg.length_penalty > 0 and lengths_R is not None:
        over = jnp.maximum(jnp.asarray(lengths_R) - rcfg.length_penalty_start, 0).astype(jnp.float32)
        total = total - rcfg.length_penalty * over
    return jnp.where(empty_R, jnp.float32(rcfg.empty_reward), total).astype(jnp.float32)


def _mean_std(x_R: Array, valid_R: Array) -> tuple[Array, Array]:
    """Mean and population std over the valid rows (0, 0 when none is valid)."""
    x = jnp.asarray(x_R, jnp.float32)
    v = jnp.asarray(valid_R, bool)
    n = jnp.maximum(v.sum(), 1).astype(jnp.float32)
    mean = jnp.where(v, x, 0.0).sum() / n
    std = jnp.sqrt(jnp.where(v, (x - mean) ** 2, 0.0).sum() / n)
    return mean, std


def reward_metrics(
    rcfg: RewardConfig,
    rewards_R: Array,
    components: Mapping[str, Array],
    empty_R: Array,
    *,
    verifier_truncated: Mapping[str, Array],
    truncated_R: Array | None = None,
    lengths_R: Array | None = None,
    repetition_R: Array | None = None,
    tokens_RxN: Array | None = None,
    content_RxN: Array | None = None,
) -> dict[str, Array]:
    """Per-step diagnostics as float32 scalars (the same names on the host and on device).

    reward/mean|std; <component>/mean|std over non-empty rows (components are cme/<verifier>, the baselines,
    length, random); response/empty and response/truncated (counts); cme/<verifier>/truncated (responses cut
    to the verifier's max_length); with the policy's ids also response/length_mean, response/repetition_<n>
    and response/distinct_2.
    """
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    empty_R = jnp.asarray(empty_R, bool)
    valid = ~empty_R
    out = {"reward/mean": f32(jnp.mean(rewards_R)), "reward/std": f32(jnp.std(rewards_R))}
    out["response/empty"] = f32(empty_R.sum())
    if truncated_R is not None:
        out["response/truncated"] = f32(jnp.asarray(truncated_R, bool).sum())
    for k, x in components.items():
        out[f"{k}/mean"], out[f"{k}/std"] = _mean_std(x, valid)
    for name, t in verifier_truncated.items():
        out[f"cme/{name}/truncated"] = f32(jnp.asarray(t, bool).sum())
    if lengths_R is not None:
        out["response/length_mean"] = f32(jnp.mean(jnp.asarray(lengths_R, jnp.float32)))
    if repetition_R is not None:
        out[f"response/repetition_{rcfg.repetition_ngram}"] = f32(jnp.mean(repetition_R))
    if tokens_RxN is not None and content_RxN is not None:
        out["response/distinct_2"] = distinct_ngrams(tokens_RxN, content_RxN, 2)
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


def _needs_entropy(names: Sequence[str]) -> bool:
    return any(n in ("neg_entropy", "self_certainty") for n in names)


def guard_inputs(tokens_RxN: Array, mask_RxN: Array, stopped_R: Array, ngram: int) -> tuple[Array, Array, Array]:
    """Lengths, the content mask (no stop token) and the n-gram repetition of each response."""
    lengths = response_lengths(mask_RxN, stopped_R)
    cmask = content_mask(mask_RxN, stopped_R)
    return lengths, cmask, ngram_repetition(jnp.asarray(tokens_RxN), cmask, ngram)


guard_inputs_jit = jax.jit(guard_inputs, static_argnames="ngram")


# ----------------------------------------------------------------------------------------------------------
# Host side: one step's batch, scoring, diagnostics


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


def _verifier_scores(verifier: Verifier, batch: RewardBatch, policy: Any, **kw: Any) -> VerifierScores:
    """Score with the fast path when the verifier shares the policy's vocabulary, else through text."""
    if policy is not None and batch.has_tokens and verifier.shares_vocabulary(policy.tokenizer):
        return _fast_scores(verifier, batch, kw.get("chunk_budget", DEFAULT_CHUNK_ELEMENTS))
    return score_texts(verifier, batch.row_prompts(), batch.responses, batch.stopped, **kw)


def _fast_scores(verifier: Verifier, batch: RewardBatch, chunk_budget: int) -> VerifierScores:
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
        out = score_same_vocab_jit(weights, cfg, toks, mask, *args, **kw)
        return {k: np.asarray(v) for k, v in out.items()}

    out = run(batch.prompts)
    mean = out["mean"]
    if vc.contrastive:
        mean = mean - run([""])["mean"]
    return VerifierScores(mean.astype(np.float32), out["count"], out["empty"], out["truncated"])


def verifier_contexts(verifier: Verifier, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The verifier's context ids of each prompt, left-padded to a length bucket: int32 [P, C] and mask."""
    ctx = [verifier.context_ids(p) for p in prompts]
    return left_pad(ctx, bucket_length(max(map(len, ctx))), verifier.pad)


def _policy_stats(batch: RewardBatch, policy: Any, names: Sequence[str], chunk_budget: int) -> dict[str, np.ndarray]:
    if policy is None or batch.prompt_tokens is None or not batch.has_tokens:
        raise CmeError(f"reward {names[0]!r} needs the policy model and its prompt and response ids")
    tokens, mask = join_prompts(batch.prompt_tokens, batch.prompt_mask, batch.response_tokens, batch.response_mask)
    start = int(np.shape(batch.prompt_tokens)[1])
    out = policy_response_stats_jit(
        policy.weights, policy.cfg, tokens, mask, start=start, entropy=_needs_entropy(names), chunk_budget=chunk_budget
    )
    return {k: np.asarray(v) for k, v in out.items()}


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
    progress: Any = None,
    skip_unweighted: bool = False,
) -> RewardOutput:
    """Rewards of one step's responses under `rcfg`, on the host (any verifier tokenizer).

    With `skip_unweighted`, verifiers whose total weight is 0 (monitors, which the trainer's held-out
    evaluation scores) are not scored: they cannot change a reward.

    `verifiers` are loaded in the order of rcfg.verifiers. `policy` (anything with .weights, .cfg and
    .tokenizer, e.g. a LoadedModel) is needed by the policy baselines and enables the same-vocabulary
    fast path. `rng` is needed by the random reward. Non-finite scores raise CmeError naming the source.
    """
    R, G = len(batch.responses), batch.group_size
    names = rcfg.term_names
    _check_setup(rcfg, verifiers, G)
    if rcfg.needs_policy_tokens and not batch.has_tokens:
        raise CmeError("the policy baselines and the guards need the policy's response ids; only cme works on text")
    empty = np.array([not r for r in batch.responses], bool)
    lengths = cmask = rep = None
    if batch.has_tokens:
        ids = (batch.response_tokens, batch.response_mask, np.asarray(batch.stopped))
        lengths, cmask, rep = (np.asarray(x) for x in guard_inputs_jit(*ids, ngram=rcfg.repetition_ngram))
        empty |= lengths <= 0

    scores: dict[str, VerifierScores] = {}
    timings: dict[str, float] = {}
    if "cme" in names:
        kw = dict(batch_size=batch_size, mesh=mesh, chunk_budget=chunk_budget, progress=progress)
        cme_weight = next(t.weight for t in rcfg.terms if t.name == "cme")
        if skip_unweighted:
            verifiers = [v for v in verifiers if cme_weight * v.config.weight != 0]
        served = [v for v in verifiers if v.remote is not None]
        # Served verifiers wait on the network in threads while the local ones run here.
        with ThreadPoolExecutor(max_workers=max(1, len(served))) as pool:
            pending = {v.name: pool.submit(_verifier_scores, v, batch, policy, **kw) for v in served}
            local = {v.name: _verifier_scores(v, batch, policy, **kw) for v in verifiers if v.remote is None}
            scores = {v.name: pending[v.name].result() if v.name in pending else local[v.name] for v in verifiers}
        for s in scores.values():
            empty |= s.empty
        if served:
            timings["time/score_remote"] = max(scores[v.name].served_seconds for v in served)
    valid = ~empty
    for name, s in scores.items():
        check_finite(s.mean, valid, f"verifier {name!r}")
    used = [n for n in names if n in POLICY_TERMS]
    stats = _policy_stats(batch, policy, used, chunk_budget) if used else {}
    for name in used:
        check_finite(stats[name], valid, f"reward {name!r}")
    random_R = None
    if "random" in names and rng is not None:
        random_R = np.asarray(jax.random.uniform(rng, (R,)), np.float32)

    components, weights = reward_components(
        rcfg,
        cme={k: s.mean for k, s in scores.items()},
        verifier_weights={v.name: v.config.weight for v in verifiers},
        policy=stats,
        lengths_R=lengths,
        random_R=random_R,
    )
    total = finish_rewards(rcfg, components, weights, empty, G, lengths_R=lengths, repetition_R=rep)
    metrics = reward_metrics(
        rcfg,
        total,
        components,
        empty,
        verifier_truncated={k: s.truncated for k, s in scores.items()},
        truncated_R=batch.truncated,
        lengths_R=lengths,
        repetition_R=rep,
        tokens_RxN=None if cmask is None else np.asarray(batch.response_tokens),
        content_RxN=cmask,
    )
    return RewardOutput(
        np.asarray(total),
        {k: np.asarray(v) for k, v in components.items()},
        empty,
        {k: float(v) for k, v in metrics.items()},
        timings,
    )


# ----------------------------------------------------------------------------------------------------------
# Device side: the reward inside the trainer's single jitted step


@dataclasses.dataclass(frozen=True)
class _VerifierStatic:
    """What the device reward needs of a verifier besides its weights (closed over: Python constants)."""

    name: str
    weight: float
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
    placed by `frozen_shardings(mesh)`. Rewards equal `compute_rewards` on the same rollout; the metrics
    carry the same names as its diagnostics, plus `<component>/nonfinite` counts, which `check` turns into
    the host path's error (rows with a non-finite score turn every reward of the step into NaN, so the
    update is skipped and nothing non-finite is learned from).
    """

    fn: Callable[..., tuple[Array, dict[str, Array]]]
    rcfg: RewardConfig
    verifiers: tuple[Verifier, ...]
    hidden_ids: np.ndarray

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

    def check(self, metrics: Mapping[str, Any]) -> None:
        """Raise the host path's CmeError when a step's metrics count non-finite scores."""
        for key, value in metrics.items():
            if not key.endswith("/nonfinite") or not float(np.asarray(value)) > 0:
                continue
            comp = key.removesuffix("/nonfinite")
            what = f"verifier {comp[4:]!r}" if comp.startswith("cme/") else f"reward {comp!r}"
            raise CmeError(
                f"{what} gave {int(float(np.asarray(value)))} non-finite score(s) this step (the update was skipped); "
                "run it in float32 (dtype: float32) or check the model"
            )


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

    Everything `compute_rewards` does runs on device from the policy's ids: verifier rows are built with
    `score_same_vocab` (special tokens dropped as decoding drops them), the baselines from one policy forward.
    """
    names = rcfg.term_names
    verifiers = tuple(verifiers) if "cme" in names else ()
    _check_setup(rcfg, verifiers, group_size)
    if not all(v.shares_vocabulary(policy_tokenizer) for v in verifiers):
        return None
    statics = tuple(
        _VerifierStatic(
            v.name,
            v.config.weight,
            v.model.cfg,
            v.end_id if v.end_id is not None else 0,
            v.config.score_eos,
            v.config.max_length,
            v.pad,
            v.config.contrastive,
        )
        for v in verifiers
    )
    used = [n for n in names if n in POLICY_TERMS]
    G = group_size

    def fn(policy_params: Weights, ro: Any, prompts_R: Array, pmask_R: Array, frozen: Any):
        R = ro.tokens.shape[0]
        hidden = frozen["hidden_ids"]
        lengths, cmask, rep = guard_inputs(ro.tokens, ro.mask, ro.stopped, rcfg.repetition_ngram)
        _, visible = visible_response(ro.tokens, ro.mask, ro.stopped, hidden, 0)
        empty = (lengths <= 0) | (visible <= 0)
        cme, cut = {}, {}
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
                mean = out["mean"]
                if st.contrastive:
                    bare = score_same_vocab(fz["weights"], st.cfg, fz["bare"], fz["bare_mask"], *args, **kw)
                    mean = mean - bare["mean"]
            cme[st.name], cut[st.name] = mean, out["truncated"]
            empty = empty | out["empty"]
        stats = {}
        if used:
            tokens = jnp.concatenate([prompts_R, ro.tokens.astype(prompts_R.dtype)], axis=1)
            mask = jnp.concatenate([pmask_R.astype(bool), ro.mask.astype(bool)], axis=1)
            stats = policy_response_stats(
                policy_params,
                policy_cfg,
                tokens,
                mask,
                start=prompts_R.shape[1],
                entropy=_needs_entropy(used),
                chunk_budget=chunk_budget,
            )
        random_R = jax.random.uniform(frozen["rng"], (R,)) if "random" in names else None
        components, weights = reward_components(
            rcfg,
            cme=cme,
            verifier_weights={st.name: st.weight for st in statics},
            policy=stats,
            lengths_R=lengths,
            random_R=random_R,
        )
        total = finish_rewards(rcfg, components, weights, empty, G, lengths_R=lengths, repetition_R=rep)
        valid = ~empty
        nonfinite = {k: (valid & ~jnp.isfinite(x)).sum() for k, x in components.items() if k != "length"}
        bad = sum((n for n in nonfinite.values()), jnp.zeros((), jnp.int32)) > 0
        total = jnp.where(bad, jnp.nan, total)
        metrics = reward_metrics(
            rcfg,
            total,
            components,
            empty,
            verifier_truncated=cut,
            truncated_R=ro.truncated,
            lengths_R=lengths,
            repetition_R=rep,
            tokens_RxN=ro.tokens,
            content_RxN=cmask,
        )
        metrics.update({f"{k}/nonfinite": n.astype(jnp.float32) for k, n in nonfinite.items()})
        return total, metrics

    return DeviceReward(fn, rcfg, tuple(verifiers), hidden_token_ids(policy_tokenizer))
