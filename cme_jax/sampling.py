"""Batched generation on device: one prefill per prompt, its KV cache copied to G samples, a while-loop decode.

`sample` is a pure, jittable function of (weights, left-padded prompts, rng); the same code runs on one CPU,
one GPU or a sharded mesh (place the weights with `weight_shardings` and the prompts with `batch_sharding` and
jit it; the cache follows the weights' mesh). Filters and the draw work row by row, so batch rows may be split
over the data axes.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cme_jax.distributed import data_shards
from cme_jax.errors import CmeError
from cme_jax.models import decode_layout
from cme_jax.models.decode_layout import LayoutChoice
from cme_jax.models.sharding import batch_sharding, constrain, mesh_of
from cme_jax.models.transformer import (
    Array,
    KVCache,
    ModelConfig,
    Weights,
    default_positions,
    forward_hidden,
    init_cache,
    lm_head,
    softcap,
)
from cme_jax.sources import LoadedModel
from cme_jax.tokens import (
    DEFAULT_PLAIN_TEMPLATE,
    PromptFormat,
    bucket_length,
    encode_prompts,
    left_pad,
    pad_id,
    stop_token_ids,
)

# The draw picks a block of this many vocabulary entries, then a token inside it: two short cumulative sums
# instead of one over the whole vocabulary (fewer rounding steps, and far cheaper than Gumbel noise per entry).
_DRAW_BLOCK = 256
# Bisection steps over float32 bit patterns in [0, 1]: enough to separate every pair of distinct floats.
_TOP_P_STEPS = 30
# Decoding reads the whole KV cache every step, so the cache grows in up to this many stages as the responses do
# (each stage is one more compiled loop body; short responses use one).
_CACHE_STAGES = 4
_MIN_STAGE_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How responses are drawn; temperature 0 means greedy. Filters apply in the order top-k, top-p, min-p."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    num_samples: int = 1  # G responses per prompt

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        return bool(self.top_k) or self.top_p < 1.0 or self.min_p > 0.0


@struct.dataclass
class Rollout:
    """G responses per prompt, group-major rows: [p0 s0, p0 s1, ..., p1 s0, ...]."""

    tokens: Array  # [R, N] int32, pad after the end
    mask: Array  # [R, N] bool, response tokens (a final stop token included)
    logprobs: Array  # [R, N] float32 log p of each token under the temperature-scaled (greedy: raw) logits, unfiltered
    lengths: Array  # [R] int32
    stopped: Array  # [R] bool, ended on a stop token
    truncated: Array  # [R] bool, hit max_new_tokens without a stop token


# ----------------------------------------------------------------------------------------------------------
# Filters and the draw. They work on vocabulary-major [V, R] arrays, the orientation the head produces fastest
# (see `_head_VxR`), so every reduction reads memory in order; rows stay independent.


def _top_k_keep(s_VxR: Array, k: int) -> Array:
    """Entries at or above the k-th largest of their row (ties at the boundary stay, as in transformers)."""
    # The barrier keeps XLA from rewriting top-k followed by a slice into a full sort of the vocabulary.
    values_RxK = jax.lax.optimization_barrier(jax.lax.top_k(s_VxR.T, min(k, s_VxR.shape[0])))[0]
    return s_VxR >= values_RxK[:, -1][None, :]


def _top_p_keep(e_VxR: Array, top_p: float) -> Array:
    """Nucleus: keep token j when the mass of the tokens strictly more likely than j is below top_p.

    `e` holds unnormalised probabilities in [0, 1]. The kept set is {e >= v} for the smallest v whose mass above
    it, sum(e[e > v]), falls below top_p * sum(e); v is found by bisection over float32 bit patterns, which is
    exact and needs no sort (sorting the vocabulary every step is slow on CPUs).
    """
    target_R = top_p * jnp.sum(e_VxR, axis=0)
    R = e_VxR.shape[1]

    def mass_above(bits_R):
        v = jax.lax.bitcast_convert_type(bits_R, jnp.float32)[None, :]
        return jnp.sum(jnp.where(e_VxR > v, e_VxR, 0.0), axis=0)

    def step(_, lo_hi):
        lo, hi = lo_hi
        mid = lo + (hi - lo) // 2
        ok = mass_above(mid) < target_R  # mid is a valid threshold: look below it
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    # Invariant: mass_above(lo) >= target (0.0 keeps everything) and mass_above(hi) < target (1.0 keeps none).
    lo = jnp.zeros((R,), jnp.int32)
    hi = jnp.full((R,), np.float32(1.0).view(np.int32), jnp.int32)
    _, hi = jax.lax.fori_loop(0, _TOP_P_STEPS, step, (lo, hi))
    return e_VxR >= jax.lax.bitcast_convert_type(hi, jnp.float32)[None, :]


def _inverse_cdf(u_R: Array, w_VxR: Array) -> Array:
    """Per column, index j with probability w_j / sum(w) (w >= 0) from one uniform u in [0, 1); w_j = 0 never comes."""
    V, R = w_VxR.shape
    nb = -(-V // _DRAW_BLOCK)
    w = jnp.pad(w_VxR, ((0, nb * _DRAW_BLOCK - V), (0, 0))).reshape(nb, _DRAW_BLOCK, R)
    cum_blocks = jnp.cumsum(jnp.sum(w, axis=1), axis=0)  # [nb, R]
    x = (1.0 - u_R) * cum_blocks[-1]  # in (0, total]
    # The first block whose cumulative mass reaches x; it has positive mass since x exceeds every earlier total.
    blk = jnp.minimum(jnp.sum(cum_blocks < x[None, :], axis=0), nb - 1)
    before = jnp.take_along_axis(cum_blocks, jnp.maximum(blk - 1, 0)[None, :], axis=0)[0]
    before = jnp.where(blk > 0, before, 0.0)
    cum = jnp.cumsum(jnp.take_along_axis(w, blk[None, None, :], axis=0)[0], axis=0)  # [block, R]
    rest = jnp.minimum(x - before, cum[-1])  # > 0; clipped against the two sums' different rounding
    return (blk * _DRAW_BLOCK + jnp.sum(cum < rest[None, :], axis=0)).astype(jnp.int32)


def _keep_VxR(s_VxR: Array, e_VxR: Array, scfg: SamplingConfig) -> Array | None:
    """Which tokens top-k, then top-p (renormalised after top-k), then min-p leave; None when none is set."""
    keep = None
    if scfg.top_k:
        keep = _top_k_keep(s_VxR, scfg.top_k)
    if scfg.top_p < 1.0:
        nucleus = _top_p_keep(e_VxR if keep is None else jnp.where(keep, e_VxR, 0.0), scfg.top_p)
        keep = nucleus if keep is None else keep & nucleus
    if scfg.min_p > 0.0:
        floor = e_VxR >= scfg.min_p  # p_j / p_max = e_j; the filters above never remove the top token
        keep = floor if keep is None else keep & floor
    return keep


def _draw_VxR(logits_VxR: Array, u_R: Array, scfg: SamplingConfig) -> tuple[Array, Array]:
    """`draw` on vocabulary-major logits."""
    s = logits_VxR.astype(jnp.float32)
    if not scfg.greedy:
        s = s / scfg.temperature
    top_R = jnp.max(s, axis=0)
    e = jnp.exp(s - top_R[None, :])  # in [0, 1], 1 at the most likely token
    lse_R = top_R + jnp.log(jnp.sum(e, axis=0))
    if scfg.greedy:  # the first maximum, as argmax; two plain reductions run faster than XLA's CPU argmax
        index_V = jnp.arange(s.shape[0], dtype=jnp.int32)[:, None]
        tok = jnp.min(jnp.where(s == top_R[None, :], index_V, s.shape[0]), axis=0)
    else:
        keep = _keep_VxR(s, e, scfg)
        tok = _inverse_cdf(u_R, e if keep is None else jnp.where(keep, e, 0.0))
    picked = jnp.take_along_axis(s, tok[None, :], axis=0)[0]
    return tok, picked - lse_R


def draw(logits_RxV: Array, u_R: Array, scfg: SamplingConfig) -> tuple[Array, Array]:
    """Next tokens and their log-probs under the temperature-scaled logits (the filters shape only the draw).

    Greedy takes the argmax; otherwise one uniform u per row picks a token by inverse CDF over the kept tokens.
    """
    return _draw_VxR(logits_RxV.T, u_R, scfg)


# ----------------------------------------------------------------------------------------------------------
# The sampler


def _head_VxR(weights: Weights, cfg: ModelConfig, h_RxD: Array) -> Array:
    """Float32 logits of single positions, vocabulary-major [V, R].

    With few rows XLA's CPU matmul streams the [V, D] head about twice as fast into this orientation as into
    [R, V], and the filters and the draw reduce over its contiguous leading axis.
    """
    logits = jnp.einsum("vd,rd->vr", lm_head(weights), h_RxD, preferred_element_type=jnp.float32)
    return softcap(constrain(logits, ("vocab", "batch"), mesh_of(weights.embed)), cfg.final_softcap)


def _grow(cache: KVCache, n: int) -> KVCache:
    """Room for n more tokens per row (stacked or per-layer buffers; keys [.., H, S], values [.., S, H])."""
    slots = lambda axis: lambda x: jnp.pad(x, [(0, n if a == x.ndim + axis else 0) for a in range(x.ndim)])
    return cache.replace(
        k=jax.tree.map(slots(-1), cache.k),
        v=jax.tree.map(slots(-2), cache.v),
        valid=slots(-1)(cache.valid),
        pos=slots(-1)(cache.pos),
    )


def _repeat_rows(cache: KVCache, g: int) -> KVCache:
    """Each row of a stacked cache repeated g times (group-major)."""
    if g == 1:
        return cache
    return cache.replace(
        k=jnp.repeat(cache.k, g, axis=1),
        v=jnp.repeat(cache.v, g, axis=1),
        valid=jnp.repeat(cache.valid, g, axis=0),
        pos=jnp.repeat(cache.pos, g, axis=0),
    )


def cache_stages(n: int) -> list[int]:
    """The decode steps at which each cache stage ends: up to `_CACHE_STAGES` equal stages of at least
    `_MIN_STAGE_TOKENS`, the last ending at n. A stage ending at step e holds the prompt plus e tokens."""
    k = max(1, min(_CACHE_STAGES, n // _MIN_STAGE_TOKENS))
    return [(n * (j + 1)) // k for j in range(k)]


def _rows(tree: Any, mesh: Any) -> Any:
    """Every array of the loop state ([R] or [R, N]) placed by the rules: rows over the batch axes."""
    return jax.tree.map(lambda x: constrain(x, ("batch", "sequence")[: x.ndim], mesh), tree)


def _is_stop(tok_R: Array, stop_ids: Array) -> Array:
    return jnp.any(tok_R[:, None] == stop_ids[None, :], axis=-1)


def sample(
    weights: Weights,
    cfg: ModelConfig,
    prompt_tokens_BxP: Array,
    prompt_mask_BxP: Array,
    rng: Array,
    scfg: SamplingConfig,
    stop_ids: Array | Sequence[int] = (),
    pad_id: int = 0,
    layout: LayoutChoice = "auto",
    decode_weights: Weights | None = None,
) -> Rollout:
    """Draw num_samples responses per left-padded prompt; pure and jittable (cfg, scfg, pad_id, layout static).

    The prompt mask is True at real tokens. Rows are group-major (prompt b's samples are rows b*G .. b*G+G-1).
    A row ends after its first token in `stop_ids` (kept in the response) or after max_new_tokens. Step t draws
    with the key fold_in(rng, t) and one uniform per row, so results depend only on rng and the inputs.
    `layout` picks the decode path (see `decode_layout.resolve`); all give the same tokens. On a mesh (weights
    placed by `weight_shardings`) the cache and the loop state are placed by the rules: rows over the batch axes.
    `decode_weights` is `prepare_decode(weights, cfg, layout)` built once by a caller that samples many batches
    with the same weights; without it the per-layer layouts build that copy in every call. Weights with low-rank
    adapters (`lora.adapted`) prefill with the adapters applied on the fly and decode with them merged into the
    layout's one copy of the layers (measured faster than decoding on the fly: README, LoRA).
    """
    B, P = prompt_tokens_BxP.shape
    G, N = scfg.num_samples, scfg.max_new_tokens
    R = B * G
    mesh = mesh_of(weights.embed)
    mask = prompt_mask_BxP.astype(bool)
    positions = default_positions(mask)
    stop_ids = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
    chosen = decode_layout.resolve(layout)

    def pick(i: Array, logits_VxR: Array) -> tuple[Array, Array]:
        u = jax.random.uniform(jax.random.fold_in(rng, i), (R,), jnp.float32)
        return _draw_VxR(logits_VxR, u, scfg)

    with jax.named_scope("prefill"):
        # A cache exactly as long as the prompt is overwritten whole, so XLA attends to the fresh keys directly
        # instead of writing them into a larger buffer and reading them back; the N response slots come after.
        cache = init_cache(cfg, B, P, weights.embed.dtype)
        h, cache = forward_hidden(weights, cfg, prompt_tokens_BxP, positions, mask, cache)
        # Prefill once per prompt; each of its G samples continues from a copy of the cache.
        stages = cache_stages(N)
        cache = _repeat_rows(_grow(cache, stages[0]), G)
        logits_VxB = _head_VxR(weights, cfg, h[:, -1])
        tok, lp = pick(jnp.zeros((), jnp.int32), jnp.repeat(logits_VxB, G, axis=1))
    if chosen == "stacked":
        if decode_weights is not None:
            raise ValueError(f"layout={layout!r} decodes the stored weights; pass decode_weights=None")
        step_weights = decode_layout.to_layout(weights, cfg, chosen)
        decode = lambda w, *args: forward_hidden(w, cfg, *args)
    else:
        step_weights = decode_layout.to_layout(weights, cfg, chosen) if decode_weights is None else decode_weights
        cache = decode_layout.split_cache(cache)
        decode = lambda w, *args: decode_layout.forward_unrolled(w, cfg, chosen, *args)
    step_weights = decode_layout.gather_width(step_weights, cfg, chosen)
    place_cache = lambda c: decode_layout.constrain_cache(c, mesh, chosen)

    toks = jnp.full((R, N), pad_id, jnp.int32).at[:, 0].set(tok)
    tmask = jnp.zeros((R, N), bool).at[:, 0].set(True)
    logps = jnp.zeros((R, N), jnp.float32).at[:, 0].set(lp)
    done = _is_stop(tok, stop_ids)
    pos = jnp.repeat(positions[:, -1] + 1, G, axis=0)

    def cond(end: int):
        def until(state):
            i, _, _, _, done, _, _, _ = state
            return (i < end) & ~jnp.all(done)

        return until

    def body(state):
        # Feed the token drawn at step i-1, draw step i; finished rows keep running but record nothing.
        i, toks, tmask, logps, done, cache, tok, pos = state
        live = ~done
        h, cache = decode(step_weights, tok[:, None], pos[:, None], live[:, None], cache)
        tok, lp = pick(i, _head_VxR(step_weights, cfg, h[:, 0]))
        tok = jnp.where(live, tok, pad_id)
        toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))
        tmask = jax.lax.dynamic_update_slice(tmask, live[:, None], (0, i))
        logps = jax.lax.dynamic_update_slice(logps, jnp.where(live, lp, 0.0)[:, None], (0, i))
        done = done | (live & _is_stop(tok, stop_ids))
        toks, tmask, logps, done, tok = _rows((toks, tmask, logps, done, tok), mesh)
        return i + 1, toks, tmask, logps, done, cache, tok, pos + 1

    state = (jnp.ones((), jnp.int32), *_rows((toks, tmask, logps, done), mesh), place_cache(cache), tok, pos)
    with jax.named_scope("decode"):
        for j, end in enumerate(stages):
            if j:  # the next stage's slots: one copy of the cache, where every step reads all of it
                grown = place_cache(_grow(state[5], end - stages[j - 1]))
                state = (*state[:5], grown, *state[6:])
            state = jax.lax.while_loop(cond(end), body, state)
        _, toks, tmask, logps, done, _, _, _ = state
    lengths = jnp.sum(tmask, axis=1).astype(jnp.int32)
    return Rollout(tokens=toks, mask=tmask, logprobs=logps, lengths=lengths, stopped=done, truncated=~done)


sample_jit = jax.jit(sample, static_argnames=("cfg", "scfg", "pad_id", "layout"))
_to_layout_jit = jax.jit(decode_layout.to_layout, static_argnames=("cfg", "layout"))


def prepare_decode(weights: Weights, cfg: ModelConfig, layout: LayoutChoice = "auto") -> Weights | None:
    """The per-layer copy of `weights` that `sample` decodes with, or None where `layout` decodes stacked layers.

    Callers that sample many batches with the same weights build it once and pass it as `sample(...,
    decode_weights=)`: building it inside every call rewrites every layer matrix (on a CPU, into fresh memory
    whose first touch costs as much as the copy), about a tenth of a 16 x 64 sampling call on a 2-core CPU.
    """
    chosen = decode_layout.resolve(layout)
    return None if chosen == "stacked" else _to_layout_jit(weights, cfg, chosen)


# ----------------------------------------------------------------------------------------------------------
# Host side


def response_token_lists(rollout: Rollout, strip_stop: bool = True) -> list[list[int]]:
    """Host-side token ids of each response, without the final stop token when strip_stop."""
    toks = np.asarray(rollout.tokens)
    lengths = np.asarray(rollout.lengths)
    stopped = np.asarray(rollout.stopped)
    out = []
    for row, n, s in zip(toks, lengths, stopped):
        n = int(n) - (1 if (s and strip_stop) else 0)
        out.append(row[: max(n, 0)].tolist())
    return out


def batch_decode(tokenizer: Any, token_lists: Sequence[Sequence[int]]) -> list[str]:
    """Texts of token id lists with special tokens removed."""
    return [tokenizer.decode(list(t), skip_special_tokens=True) for t in token_lists]


def decode_responses(tokenizer: Any, rollout: Rollout) -> list[str]:
    """Response texts with the stop token and other special tokens removed."""
    return batch_decode(tokenizer, response_token_lists(rollout))


def default_dtype() -> Any:
    """bfloat16 on accelerators, float32 on the CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def fit_prompts(ids: list[list[int]], max_new_tokens: int, max_position: int, truncate_left: bool) -> list[list[int]]:
    """Check that prompt + response fits the context window, truncating from the left only on request."""
    room = max_position - max_new_tokens
    if room < 1:
        raise CmeError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {max_position}-token "
            "context; lower it"
        )
    out = []
    for i, p in enumerate(ids):
        if not p:
            raise CmeError(f"prompt {i} is empty after tokenization; give every prompt some text")
        if len(p) > room:
            if not truncate_left:
                raise CmeError(
                    f"prompt {i} has {len(p)} tokens but only {room} fit with max_new_tokens={max_new_tokens} "
                    f"in the {max_position}-token context; shorten it or pass --truncate-left"
                )
            p = p[-room:]
        out.append(p)
    return out


def generate_responses(
    model: LoadedModel,
    prompts: Sequence[str],
    scfg: SamplingConfig,
    *,
    seed: int = 0,
    fmt: PromptFormat = "auto",
    template: str = DEFAULT_PLAIN_TEMPLATE,
    batch_size: int = 16,
    stop_strings: Sequence[str] = (),
    truncate_left: bool = False,
    progress: bool = False,
    mesh: Any = None,
) -> list[list[dict[str, Any]]]:
    """For each prompt, num_samples dicts with response text, token ids, stopped flag and summed log-prob.

    Prompts are sorted by length into batches of `batch_size` (the last one padded with repeats, so every batch
    has the same shape) and left-padded to a bucket length, so a run compiles one program per bucket. With a
    `mesh`, prompt rows are split over its data axes (place the weights with `load_model(..., mesh=mesh)`).
    With `progress`, one line per batch goes to stderr.
    """
    if not prompts:
        raise CmeError("no prompts given; pass at least one prompt")
    if batch_size < 1:
        raise CmeError(f"batch size must be >= 1, got {batch_size}")
    tok = model.tokenizer
    ids = encode_prompts(tok, prompts, fmt, template)
    ids = fit_prompts(ids, scfg.max_new_tokens, model.cfg.max_position, truncate_left)
    stops = np.asarray(stop_token_ids(tok, stop_strings), np.int32)
    pad = pad_id(tok)
    order = np.argsort([len(p) for p in ids], kind="stable")  # similar lengths share a bucket
    batch_size = min(batch_size, len(ids))
    rows_in = None
    if mesh is not None:
        rows_in = batch_sharding(mesh, 2)
        shards = data_shards(mesh)
        batch_size = -(-batch_size // shards) * shards  # every device gets whole rows
    results: list[list[dict[str, Any]]] = [[] for _ in prompts]
    rng = jax.random.key(seed)
    num_batches = -(-len(ids) // batch_size)
    G = scfg.num_samples
    t_start, n_tokens, seen_shapes = time.perf_counter(), 0, set()
    step_weights = prepare_decode(model.weights, model.cfg)  # once for all batches, not inside every call
    for b, start in enumerate(range(0, len(ids), batch_size)):
        idx = order[start : start + batch_size]
        batch = [ids[i] for i in idx]
        rows = len(batch)
        batch = batch + [batch[-1]] * (batch_size - rows)
        toks, mask = left_pad(batch, bucket_length(max(len(p) for p in batch)), pad)
        if rows_in is not None:
            toks, mask = jax.device_put(toks, rows_in), jax.device_put(mask, rows_in)
        t0 = time.perf_counter()
        key = jax.random.fold_in(rng, b)
        ro = sample_jit(model.weights, model.cfg, toks, mask, key, scfg, stops, pad, decode_weights=step_weights)
        resp = response_token_lists(ro)
        stopped, logps = np.asarray(ro.stopped), np.asarray(ro.logprobs)
        for j, i in enumerate(idx[:rows]):
            for g in range(G):
                r = j * G + g
                results[i].append(
                    {
                        "response": tok.decode(resp[r], skip_special_tokens=True),
                        "tokens": resp[r],
                        "stopped": bool(stopped[r]),
                        "logprob": float(logps[r].sum()),
                    }
                )
        if progress:
            dt = time.perf_counter() - t0
            lengths = np.asarray(ro.lengths)[: rows * G]
            n_tokens += int(lengths.sum())
            first = toks.shape not in seen_shapes  # this call compiled a program for the new prompt bucket
            seen_shapes.add(toks.shape)
            print(
                f"batch {b + 1}/{num_batches}: {rows} prompts x {G} samples, prompt bucket {toks.shape[1]}, "
                f"{int(lengths.sum())} tokens in {dt:.1f}s ({lengths.sum() / dt:.0f} tok/s"
                f"{', with compilation' if first else ''}), {stopped[: rows * G].mean():.0%} stopped; "
                f"total {n_tokens} tokens in {time.perf_counter() - t_start:.1f}s",
                file=sys.stderr,
            )
    return results
