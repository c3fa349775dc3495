"""Chunked next-token statistics: log-probs (and optionally entropy) without a [B, T, V] float32 array."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cme_jax.models.transformer import (
    Array,
    ModelConfig,
    Weights,
    default_positions,
    forward_hidden,
    logits_from_hidden,
)

# Elements of one [B, c, V] float32 logits chunk; 2**24 floats is 64 MiB.
DEFAULT_CHUNK_ELEMENTS = 2**24


def chunk_length(batch: int, length: int, vocab: int, budget: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Sequence positions per chunk so that batch * chunk * vocab stays within the budget."""
    return int(max(1, min(length, budget // max(1, batch * vocab))))


def _over_chunks(fn, arrays_BxM: tuple[Array, ...], c: int) -> dict[str, Array]:
    """Apply fn to sequence chunks of length c of [B, M, ...] arrays with a scan; outputs [B, M] each."""
    B, M = arrays_BxM[0].shape[:2]
    n = -(-M // c)
    pad = n * c - M

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, n, c, *x.shape[2:]).swapaxes(0, 1)

    def body(_, xs):
        return None, fn(*xs)

    _, out = jax.lax.scan(body, None, tuple(split(x) for x in arrays_BxM))
    return {k: v.swapaxes(0, 1).reshape(B, n * c)[:, :M] for k, v in out.items()}


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
    B, M, _ = h_BxMxD.shape
    inv_temp = 1.0 / jnp.asarray(temperature, jnp.float32)

    # Recomputing each chunk's logits in the backward pass keeps gradient memory at one chunk too.
    @jax.checkpoint
    def chunk(h_BxcxD, tgt_Bxc):
        logits = logits_from_hidden(weights, cfg, h_BxcxD) * inv_temp
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt_Bxc[..., None], axis=-1)[..., 0]
        out = {"logp": picked - lse}
        if entropy:
            p = jnp.exp(logits - lse[..., None])
            out["entropy"] = lse - jnp.sum(p * logits, axis=-1)
            out["mean_logp"] = jnp.mean(logits, axis=-1) - lse
        return out

    with jax.named_scope("token_stats"):
        c = chunk_length(B, M, cfg.vocab_size, chunk_budget)
        return _over_chunks(chunk, (h_BxMxD, targets_BxM), c)


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


def token_kl(
    weights_p: Weights,
    weights_q: Weights | None,
    cfg: ModelConfig,
    tokens_BxT: Array,
    mask_BxT: Array,
    *,
    start: int,
    chunk_budget: int = DEFAULT_CHUNK_ELEMENTS,
) -> dict[str, Array]:
    """Entropy of p and exact KL(p || q) over the whole vocabulary at each position predicting tokens[:, start:].

    p and q are two weight sets of one architecture (a trained policy and its base); without q only the
    entropy is computed. Float32 [B, T - start] arrays `entropy` (and `kl`), zero where masked; logits are
    chunked like `token_stats`.
    """
    if not 1 <= start < tokens_BxT.shape[1]:
        raise ValueError(f"start must be in [1, {tokens_BxT.shape[1]}), got {start}")
    positions = default_positions(mask_BxT)
    models = [weights_p] if weights_q is None else [weights_p, weights_q]
    hidden = tuple(forward_hidden(w, cfg, tokens_BxT, positions, mask_BxT)[0][:, start - 1 : -1] for w in models)

    def chunk(*h_BxcxD):
        logs = [jax.nn.log_softmax(logits_from_hidden(w, cfg, h)) for w, h in zip(models, h_BxcxD)]
        p = jnp.exp(logs[0])
        out = {"entropy": -jnp.sum(p * logs[0], axis=-1)}
        if len(logs) == 2:
            out["kl"] = jnp.sum(p * (logs[0] - logs[1]), axis=-1)
        return out

    B, T = tokens_BxT.shape
    # Each model's [B, c, V] float32 log-softmax lives at once: the chunk budget is shared between them.
    c = chunk_length(B, T - start, cfg.vocab_size, max(1, chunk_budget // len(models)))
    stats = _over_chunks(chunk, hidden, c)
    m = mask_BxT[:, start:].astype(jnp.float32)
    return {k: v * m for k, v in stats.items()}


token_kl_jit = jax.jit(token_kl, static_argnames=("cfg", "start", "chunk_budget"))
