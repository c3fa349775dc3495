"""Chunked next-token statistics: log-probs (and optionally entropy) without a [B, T, V] float32 array."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cme_jax.models.transformer import (
    Array,
    ModelConfig,
    Weights,
    _softcap,
    default_positions,
    forward_hidden,
    lm_head,
)

# Elements of one [B, c, V] float32 logits chunk; 2**24 floats is 64 MiB.
DEFAULT_CHUNK_ELEMENTS = 2**24


def chunk_length(batch: int, length: int, vocab: int, budget: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Sequence positions per chunk so that batch * chunk * vocab stays within the budget."""
    return int(max(1, min(length, budget // max(1, batch * vocab))))


def hidden_token_stats(
    weights: Weights,
    cfg: ModelConfig,
    h_BxMxD: Array,
    targets_BxM: Array,
    *,
    temperature: float | Array = 1.0,
    entropy: bool = False,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, Array]:
    """Stats of `targets` under logits from hidden states already aligned to predict them.

    Returns float32 [B, M] arrays: `logp` (log p(target)); with entropy=True also `entropy`
    (H(p)) and `mean_logp` (mean over the vocabulary of log p, for self-certainty).
    """
    B, M, D = h_BxMxD.shape
    V = cfg.vocab_size
    c = chunk_length(B, M, V, chunk_budget)
    n = -(-M // c)
    pad = n * c - M
    h = jnp.pad(h_BxMxD, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets_BxM, ((0, 0), (0, pad)))
    h_nxBxcxD = h.reshape(B, n, c, D).transpose(1, 0, 2, 3)
    tgt_nxBxc = tgt.reshape(B, n, c).transpose(1, 0, 2)
    head_VxD = lm_head(weights)
    inv_temp = 1.0 / jnp.asarray(temperature, jnp.float32)

    # Recomputing each chunk's logits in the backward pass keeps gradient memory at one chunk too.
    @jax.checkpoint
    def chunk(h_BxcxD, tgt_Bxc):
        logits = jnp.einsum("bcd,vd->bcv", h_BxcxD, head_VxD, preferred_element_type=jnp.float32)
        logits = _softcap(logits, cfg.final_softcap) * inv_temp
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt_Bxc[..., None], axis=-1)[..., 0]
        out = {"logp": picked - lse}
        if entropy:
            p = jnp.exp(logits - lse[..., None])
            out["entropy"] = lse - jnp.sum(p * logits, axis=-1)
            out["mean_logp"] = jnp.mean(logits, axis=-1) - lse
        return out

    def body(_, xs):
        return None, chunk(*xs)

    with jax.named_scope("token_stats"):
        _, stats = jax.lax.scan(body, None, (h_nxBxcxD, tgt_nxBxc))
    return {k: v.transpose(1, 0, 2).reshape(B, n * c)[:, :M] for k, v in stats.items()}


def token_stats(
    weights: Weights,
    cfg: ModelConfig,
    tokens_BxT: Array,
    mask_BxT: Array,
    *,
    positions_BxT: Array | None = None,
    start: int = 1,
    temperature: float | Array = 1.0,
    entropy: bool = False,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, Array]:
    """Per-token stats for targets tokens[:, start:], each [B, T - start], zero where mask is False.

    The vocabulary head runs only at the positions that predict those targets, so a caller scoring a
    response after a prompt of length P passes start=P and pays nothing for the prompt's head.
    """
    if not 1 <= start < tokens_BxT.shape[1]:
        raise ValueError(f"start must be in [1, {tokens_BxT.shape[1]}), got {start}")
    if positions_BxT is None:
        positions_BxT = default_positions(mask_BxT)
    h, _ = forward_hidden(weights, cfg, tokens_BxT, positions_BxT, mask_BxT)
    stats = hidden_token_stats(
        weights,
        cfg,
        h[:, start - 1 : -1],
        tokens_BxT[:, start:],
        temperature=temperature,
        entropy=entropy,
        chunk_budget=chunk_budget,
    )
    m = mask_BxT[:, start:].astype(jnp.float32)
    return {k: v * m for k, v in stats.items()}


def token_logprobs(
    weights: Weights,
    cfg: ModelConfig,
    tokens_BxT: Array,
    mask_BxT: Array,
    *,
    positions_BxT: Array | None = None,
    start: int = 1,
    temperature: float | Array = 1.0,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
) -> Array:
    """Float32 log p(tokens[:, t] | tokens[:, :t]) for t >= start: [B, T - start], zero where masked."""
    return token_stats(
        weights,
        cfg,
        tokens_BxT,
        mask_BxT,
        positions_BxT=positions_BxT,
        start=start,
        temperature=temperature,
        chunk_budget=chunk_budget,
    )["logp"]
