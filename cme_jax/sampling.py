"""Batched generation on device: one prefill per prompt, a KV cache copied to G samples, a while-loop decode."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cme_jax.models.transformer import (
    Array,
    KVCache,
    ModelConfig,
    Weights,
    default_positions,
    forward,
    forward_hidden,
    init_cache,
    logits_from_hidden,
)


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


@struct.dataclass
class Rollout:
    """G responses per prompt, group-major rows: [p0 s0, p0 s1, ..., p1 s0, ...]."""

    tokens: Array  # [R, N] int32, pad after the end
    mask: Array  # [R, N] bool, response tokens (a final stop token included)
    logprobs: Array  # [R, N] float32 log p of each sampled token under the temperature-scaled logits
    lengths: Array  # [R] int32
    stopped: Array  # [R] bool, ended on a stop token
    truncated: Array  # [R] bool, hit max_new_tokens without a stop token


def filter_logits(logits_RxV: Array, scfg: SamplingConfig) -> Array:
    """Temperature-scaled logits with tokens outside top-k / top-p / min-p set to -inf."""
    out = logits_RxV
    neg = jnp.asarray(-jnp.inf, out.dtype)
    if scfg.top_k:
        kth = jax.lax.top_k(out, min(scfg.top_k, out.shape[-1]))[0][..., -1:]
        out = jnp.where(out >= kth, out, neg)
    if scfg.top_p < 1.0:
        desc = -jnp.sort(-out, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        # Keep a token while the mass before it is below top_p; the most likely token always stays.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < scfg.top_p
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        out = jnp.where(out >= threshold, out, neg)
    if scfg.min_p > 0.0:
        floor = jnp.max(out, axis=-1, keepdims=True) + jnp.log(scfg.min_p)
        out = jnp.where(out >= floor, out, neg)
    return out


def _scaled(logits: Array, scfg: SamplingConfig) -> Array:
    return logits if scfg.greedy else logits / scfg.temperature


def _pick(key: Array, logits_RxV: Array, scfg: SamplingConfig) -> Array:
    if scfg.greedy:
        return jnp.argmax(logits_RxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_RxV, scfg), axis=-1).astype(jnp.int32)


def _repeat_cache(cache: KVCache, g: int) -> KVCache:
    rep = lambda x, axis: jnp.repeat(x, g, axis=axis)
    return KVCache(
        k=rep(cache.k, 1),
        v=rep(cache.v, 1),
        valid=rep(cache.valid, 0),
        pos=rep(cache.pos, 0),
        length=cache.length,
    )


def sample(
    weights: Weights,
    cfg: ModelConfig,
    prompt_tokens_BxP: Array,
    prompt_mask_BxP: Array,
    rng: Array,
    scfg: SamplingConfig,
    stop_ids: Array,
    pad_id: int = 0,
) -> Rollout:
    """Draw num_samples responses per left-padded prompt; pure and jittable (cfg, scfg, pad_id static)."""
    B, P = prompt_tokens_BxP.shape
    G, N = scfg.num_samples, scfg.max_new_tokens
    R = B * G
    mask = prompt_mask_BxP.astype(bool)
    positions = default_positions(mask)

    with jax.named_scope("prefill"):
        cache = init_cache(cfg, B, P + N, weights.embed.dtype)
        h, cache = forward_hidden(weights, cfg, prompt_tokens_BxP, positions, mask, cache)
        logits = logits_from_hidden(weights, cfg, h[:, -1:])[:, 0]
    # Prefill once per prompt, then give each of its G samples a copy of the cache.
    cache = _repeat_cache(cache, G)
    logits = jnp.repeat(logits, G, axis=0)
    next_pos = jnp.repeat(positions[:, -1] + 1, G, axis=0)
    stop_ids = jnp.asarray(stop_ids, jnp.int32).reshape(-1)

    init = (
        jnp.zeros((), jnp.int32),
        jnp.full((R, N), pad_id, jnp.int32),
        jnp.zeros((R, N), bool),
        jnp.zeros((R, N), jnp.float32),
        jnp.zeros((R,), bool),
        cache,
        logits,
        next_pos,
    )

    def cond(state):
        i, *_, done, _cache, _logits, _pos = state
        return (i < N) & ~jnp.all(done)

    def body(state):
        i, toks, tmask, logps, done, cache, logits, pos = state
        scaled = _scaled(logits, scfg)
        tok = _pick(jax.random.fold_in(rng, i), scaled, scfg)
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tok[:, None], axis=-1)[:, 0]
        live = ~done
        toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))
        tmask = jax.lax.dynamic_update_slice(tmask, live[:, None], (0, i))
        logps = jax.lax.dynamic_update_slice(logps, jnp.where(live, lp, 0.0)[:, None], (0, i))
        new_done = done | jnp.isin(tok, stop_ids)

        def decode(args):
            cache, _ = args
            lg, cache = forward(weights, cfg, tok[:, None], pos[:, None], live[:, None], cache)
            return cache, lg[:, 0]

        more = (i + 1 < N) & ~jnp.all(new_done)
        cache, logits = jax.lax.cond(more, decode, lambda args: args, (cache, logits))
        return (i + 1, toks, tmask, logps, new_done, cache, logits, pos + 1)

    with jax.named_scope("decode"):
        _, toks, tmask, logps, done, _, _, _ = jax.lax.while_loop(cond, body, init)
    lengths = jnp.sum(tmask, axis=1).astype(jnp.int32)
    return Rollout(tokens=toks, mask=tmask, logprobs=logps, lengths=lengths, stopped=done, truncated=~done)


sample_jit = jax.jit(sample, static_argnames=("cfg", "scfg", "pad_id"))


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


def decode_responses(tokenizer: Any, rollout: Rollout) -> list[str]:
    """Response texts with special tokens removed."""
    return [tokenizer.decode(t, skip_special_tokens=True) for t in response_token_lists(rollout)]


def batch_decode(tokenizer: Any, token_lists: Sequence[Sequence[int]]) -> list[str]:
    return [tokenizer.decode(list(t), skip_special_tokens=True) for t in token_lists]
