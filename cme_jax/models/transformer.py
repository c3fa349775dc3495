"""One decoder-only transformer, written as pure functions over a weights pytree.

Config flags cover Llama 3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3 and OLMo 2; per-family code lives in
`families.py` and only translates configs and weight names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array
NormPlacement = Literal["pre", "sandwich", "post"]
QKNorm = Literal["none", "head", "full"]
Activation = Literal["silu", "gelu_tanh"]
RopeKind = Literal["default", "linear", "llama3"]
LayerKind = Literal["full", "sliding"]
Remat = Literal["none", "full", "dots"]

# Masked attention scores use a large finite value so fully padded query rows stay finite.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding frequencies; `kind` selects the HF rope_type it reproduces."""

    theta: float = 10000.0
    kind: RopeKind = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a decoder; hashable so it can be a static jit argument."""

    family: str
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    rope_local: RopeConfig | None = None  # used by sliding-window layers when set (Gemma 3)
    norm_placement: NormPlacement = "pre"
    norm_plus_one: bool = False  # Gemma stores RMSNorm scales as w with the effective scale 1 + w
    qk_norm: QKNorm = "none"
    qkv_bias: bool = False
    activation: Activation = "silu"
    embed_scale: bool = False
    tie_embeddings: bool = False
    attn_scale: float | None = None  # defaults to head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_kinds: tuple[LayerKind, ...] = ()  # empty means every layer is "full"
    max_position: int = 8192
    remat: Remat = "none"

    @property
    def kinds(self) -> tuple[LayerKind, ...]:
        return self.layer_kinds or ("full",) * self.num_layers

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def num_params(self) -> int:
        return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract(self), is_leaf=_is_spec))


@struct.dataclass
class LayerWeights:
    """Per-layer weights stacked on a leading [L] axis; optional fields are None when unused."""

    wq: Any  # [L, D, N, H]
    wk: Any  # [L, D, K, H]
    wv: Any  # [L, D, K, H]
    wo: Any  # [L, N, H, D]
    w_gate: Any  # [L, D, F]
    w_up: Any  # [L, D, F]
    w_down: Any  # [L, F, D]
    attn_in_norm: Any = None  # [L, D]
    attn_out_norm: Any = None  # [L, D]
    mlp_in_norm: Any = None  # [L, D]
    mlp_out_norm: Any = None  # [L, D]
    q_norm: Any = None  # [L, H] ("head") or [L, N*H] ("full")
    k_norm: Any = None  # [L, H] or [L, K*H]
    bq: Any = None  # [L, N, H]
    bk: Any = None  # [L, K, H]
    bv: Any = None  # [L, K, H]


@struct.dataclass
class Weights:
    embed: Any  # [V, D]
    layers: LayerWeights
    final_norm: Any  # [D]
    lm_head: Any = None  # [V, D]; None when tied to embed


@struct.dataclass
class KVCache:
    """Keys and values for every layer plus per-slot bookkeeping shared by all layers."""

    k: Any  # [L, B, K, H, S] (see `attend`), or a tuple of L [B, K, H, S] buffers (see `split_cache`)
    v: Any  # [L, B, K, S, H], or a tuple of L [B, K, S, H] buffers
    valid: Array  # [B, S] bool, slot holds a real token
    pos: Array  # [B, S] int32 rotary position of the token in the slot
    length: Array  # [] int32, slots written so far (same for every row)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and logical axis names of one weight; the leaves of `abstract(cfg)`."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def abstract(cfg: ModelConfig) -> Weights:
    """Weights pytree of ParamSpec leaves: one description for init, sharding and restore."""
    L, D, N, K, H, F, V = (
        cfg.num_layers,
        cfg.dim,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
        cfg.vocab_size,
    )
    norm = ParamSpec((L, D), ("layers", "norm"))
    pre = cfg.norm_placement in ("pre", "sandwich")
    post = cfg.norm_placement in ("sandwich", "post")
    if cfg.qk_norm == "head":
        qn, kn = ParamSpec((L, H), ("layers", "norm")), ParamSpec((L, H), ("layers", "norm"))
    elif cfg.qk_norm == "full":
        qn, kn = ParamSpec((L, N * H), ("layers", "norm")), ParamSpec((L, K * H), ("layers", "norm"))
    else:
        qn = kn = None
    layers = LayerWeights(
        wq=ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim")),
        wk=ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        wv=ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim")),
        wo=ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed")),
        w_gate=ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        w_up=ParamSpec((L, D, F), ("layers", "embed", "mlp")),
        w_down=ParamSpec((L, F, D), ("layers", "mlp", "embed")),
        attn_in_norm=norm if pre else None,
        attn_out_norm=norm if post else None,
        mlp_in_norm=norm if pre else None,
        mlp_out_norm=norm if post else None,
        q_norm=qn,
        k_norm=kn,
        bq=ParamSpec((L, N, H), ("layers", "heads", "head_dim")) if cfg.qkv_bias else None,
        bk=ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim")) if cfg.qkv_bias else None,
        bv=ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim")) if cfg.qkv_bias else None,
    )
    return Weights(
        embed=ParamSpec((V, D), ("vocab", "embed")),
        layers=layers,
        final_norm=ParamSpec((D,), ("norm",)),
        lm_head=None if cfg.tie_embeddings else ParamSpec((V, D), ("vocab", "embed")),
    )


def init_weights(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32, std: float = 0.02) -> Weights:
    """Random weights (normal matrices, unit norm scales) for tests and benchmarks."""
    specs, treedef = jax.tree.flatten(abstract(cfg), is_leaf=_is_spec)
    keys = jax.random.split(key, len(specs))
    leaves = []
    for spec, k in zip(specs, keys):
        if spec.axes[-1] == "norm":
            base = 0.0 if cfg.norm_plus_one else 1.0
            leaves.append((base + 0.1 * jax.random.normal(k, spec.shape)).astype(dtype))
        else:
            leaves.append((std * jax.random.normal(k, spec.shape)).astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x: Array, w: Array, eps: float, plus_one: bool) -> Array:
    """RMSNorm in float32; Gemma multiplies by (1 + w) before casting, Llama casts first."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * normed.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [H/2] for one RoPE variant, computed in float64 then rounded to float32."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(rope: RopeConfig, head_dim: int, positions: Array) -> tuple[Array, Array]:
    """cos and sin [B, T, H] for integer positions [B, T]."""
    inv = jnp.asarray(rope_inv_freq(rope, head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BxTxNxH: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE (the HF layout) computed in float32."""
    x = x_BxTxNxH.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x_BxTxNxH.dtype)


def _activation(cfg: ModelConfig, x: Array) -> Array:
    if cfg.activation == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def _softcap(x: Array, cap: float | None) -> Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def attention_mask(
    q_slot_T: Array, q_pos_BxT: Array, k_valid_BxS: Array, k_pos_BxS: Array, window: Array | int | None
) -> Array:
    """Boolean [B, T, S]: causal by slot, padding removed, optional sliding window by position."""
    S = k_valid_BxS.shape[1]
    causal = jnp.arange(S)[None, None, :] <= q_slot_T[None, :, None]
    mask = causal & k_valid_BxS[:, None, :]
    if window is not None:
        in_window = (q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]) < window
        mask = mask & in_window
    return mask


def attend(cfg: ModelConfig, q_BxTxNxH: Array, k_BxKxHxS: Array, v_BxKxSxH: Array, mask_BxTxS: Array) -> Array:
    """Grouped-query attention with float32 softmax; returns [B, T, N, H].

    Keys come head-dim-major ([B, K, H, S]) and values slot-major ([B, K, S, H]): with the (b, k) batch leading,
    both products are plain [*, H] x [H, S] and [*, S] x [S, H] matmuls that read the cache in order (with keys
    [B, K, S, H], one query row against a long cache ran about 4x slower on a CPU).
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxKxHxS.shape[1]
    q = q_BxTxNxH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgth,bkhs->bkgts", q, k_BxKxHxS, preferred_element_type=jnp.float32)
    scores = _softcap(scores * cfg.scale, cfg.attn_softcap)
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v_BxKxSxH)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


# Above this many rows (tokens x batch) the out-major product's transposed result costs its consumers more than
# the orientation saves in the matmul (measured on a 2-core x86 CPU: 48 rows break even, 64 run 1.25x faster).
_OUT_MAJOR_MAX_ROWS = 48


def _linear(x: Array, w: Array, spec: str, out_major: bool) -> Array:
    """`einsum(spec, x, w)`; with out_major, w holds the same matrix as [*out, *in] (see `decode_layout`)."""
    if not out_major:
        return jnp.einsum(spec, x, w)
    n_in = len(spec.split(",")[0]) - 2  # every spec here is "bt<in>,...": the input axes follow b and t
    lead, in_shape = x.shape[:2], x.shape[2:]
    out_shape = w.shape[: w.ndim - n_in]
    w_OxI, x_MxI = w.reshape(-1, math.prod(in_shape)), x.reshape(-1, math.prod(in_shape))
    if x_MxI.shape[0] > _OUT_MAJOR_MAX_ROWS:
        return jnp.einsum("oi,mi->mo", w_OxI, x_MxI).reshape(*lead, *out_shape)
    # With few rows XLA's CPU matmul runs this orientation fastest; the barrier keeps the transpose from being
    # folded back into the product. With more rows the transposed reads in the consumers cost more than it saves.
    y_OxM = jnp.einsum("oi,mi->om", w_OxI, x_MxI)
    return jax.lax.optimization_barrier(y_OxM).T.reshape(*lead, *out_shape)


def _qkv(cfg: ModelConfig, lw: LayerWeights, x_BxTxD: Array, out_major: bool = False) -> tuple[Array, Array, Array]:
    if lw.wk is None:  # `decode_layout` on CPUs: one output-major [(N + 2K) * H, D] matrix
        B, T, _ = x_BxTxD.shape
        N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = _linear(x_BxTxD, lw.wq, "btd,do->bto", out_major=True)
        q = qkv[..., : N * H].reshape(B, T, N, H)
        k = qkv[..., N * H : (N + K) * H].reshape(B, T, K, H)
        v = qkv[..., (N + K) * H :].reshape(B, T, K, H)
    else:
        q = _linear(x_BxTxD, lw.wq, "btd,dnh->btnh", out_major)
        k = _linear(x_BxTxD, lw.wk, "btd,dkh->btkh", out_major)
        v = _linear(x_BxTxD, lw.wv, "btd,dkh->btkh", out_major)
    if cfg.qkv_bias:
        q, k, v = q + lw.bq, k + lw.bk, v + lw.bv
    if cfg.qk_norm == "head":
        q = rms_norm(q, lw.q_norm, cfg.norm_eps, cfg.norm_plus_one)
        k = rms_norm(k, lw.k_norm, cfg.norm_eps, cfg.norm_plus_one)
    elif cfg.qk_norm == "full":
        B, T, N, H = q.shape
        q = rms_norm(q.reshape(B, T, N * H), lw.q_norm, cfg.norm_eps, cfg.norm_plus_one).reshape(q.shape)
        k = rms_norm(k.reshape(B, T, -1), lw.k_norm, cfg.norm_eps, cfg.norm_plus_one).reshape(k.shape)
    return q, k, v


def _norm(cfg: ModelConfig, x: Array, w: Array | None) -> Array:
    return x if w is None else rms_norm(x, w, cfg.norm_eps, cfg.norm_plus_one)


def _mlp(cfg: ModelConfig, lw: LayerWeights, x_BxTxD: Array, out_major: bool = False) -> Array:
    if lw.w_up is None:  # `decode_layout` on CPUs: gate and up stacked into one output-major [2F, D] matrix
        gate, up = jnp.split(_linear(x_BxTxD, lw.w_gate, "btd,df->btf", out_major=True), 2, axis=-1)
    else:
        gate = _linear(x_BxTxD, lw.w_gate, "btd,df->btf", out_major)
        up = _linear(x_BxTxD, lw.w_up, "btd,df->btf", out_major)
    return _linear(_activation(cfg, gate) * up, lw.w_down, "btf,fd->btd", out_major)


def _layer(
    cfg: ModelConfig,
    lw: LayerWeights,
    x: Array,
    rope: tuple[Array, Array],
    mask_BxTxS: Array,
    keys_values: Callable[[Array, Array], tuple[Array, Array]],
    out_major: bool = False,
) -> Array:
    """One decoder block; `keys_values` takes this step's keys [B, K, H, T] and values [B, K, T, H] (writing them
    to a cache when there is one) and returns the keys and values to attend to."""
    h = _norm(cfg, x, lw.attn_in_norm)
    q, k, v = _qkv(cfg, lw, h, out_major)
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k_all, v_all = keys_values(k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3))  # [B, K, H, T], [B, K, T, H]
    # Under differentiation the [B, N, T, S] scores and probabilities are recomputed in the backward pass rather
    # than saved for every layer (64 rows x 384 tokens of a 24-layer model would keep over 30 GiB of them).
    a = jax.checkpoint(lambda *qkvm: attend(cfg, *qkvm))(q, k_all, v_all, mask_BxTxS)
    a = _linear(a, lw.wo, "btnh,nhd->btd", out_major)
    x = x + _norm(cfg, a, lw.attn_out_norm)
    h = _norm(cfg, x, lw.mlp_in_norm)
    return x + _norm(cfg, _mlp(cfg, lw, h, out_major), lw.mlp_out_norm)


def _remat(cfg: ModelConfig, fn):
    if cfg.remat == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if cfg.remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return fn


# ----------------------------------------------------------------------------------------------------------
# Forward


def default_positions(mask_BxT: Array) -> Array:
    """Rotary positions for left-padded rows: 0 at the first real token."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache with room for `length` tokens per row."""
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    return KVCache(
        k=jnp.zeros((L, batch, K, H, length), dtype),
        v=jnp.zeros((L, batch, K, length, H), dtype),
        valid=jnp.zeros((batch, length), bool),
        pos=jnp.zeros((batch, length), jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


def embed_tokens(cfg: ModelConfig, weights: Weights, tokens_BxT: Array) -> Array:
    x = jnp.take(weights.embed, tokens_BxT, axis=0)
    if cfg.embed_scale:
        x = x * jnp.asarray(math.sqrt(cfg.dim), jnp.float32).astype(x.dtype)
    return x


def forward_hidden(
    weights: Weights,
    cfg: ModelConfig,
    tokens_BxT: Array,
    positions_BxT: Array,
    mask_BxT: Array,
    cache: KVCache | None = None,
) -> tuple[Array, KVCache | None]:
    """Final-normed hidden states [B, T, D]; with a cache, the T tokens are appended at cache.length.

    Stacked weights run the layers as a scan; `decode_layout` weights (a tuple of layers) run them unrolled.
    """
    T = tokens_BxT.shape[1]
    mask_BxT = mask_BxT.astype(bool)
    x = embed_tokens(cfg, weights, tokens_BxT)
    dtype = x.dtype

    kinds = set(cfg.kinds)
    mixed = len(kinds) > 1  # only then does each layer pick its rope table and mask at run time
    window = cfg.sliding_window
    cos_g, sin_g = rope_tables(cfg.rope, cfg.head_dim, positions_BxT)
    if cfg.rope_local is not None and "sliding" in kinds:
        cos_l, sin_l = rope_tables(cfg.rope_local, cfg.head_dim, positions_BxT)
    else:
        cos_l, sin_l = cos_g, sin_g

    if cache is None:
        q_slot = jnp.arange(T)
        k_valid, k_pos = mask_BxT, positions_BxT
    else:
        start = cache.length
        q_slot = start + jnp.arange(T)
        k_valid = jax.lax.dynamic_update_slice(cache.valid, mask_BxT, (0, start))
        k_pos = jax.lax.dynamic_update_slice(cache.pos, positions_BxT.astype(jnp.int32), (0, start))
    full_mask = attention_mask(q_slot, positions_BxT, k_valid, k_pos, None) if "full" in kinds or not window else None
    local_mask = (
        attention_mask(q_slot, positions_BxT, k_valid, k_pos, window) if "sliding" in kinds and window else None
    )
    full_mask = local_mask if full_mask is None else full_mask
    local_mask = full_mask if local_mask is None else local_mask

    def pick(sliding, local, full):
        if not mixed:
            return local if kinds == {"sliding"} else full
        return jnp.where(sliding, local, full)

    if isinstance(weights.layers, tuple):
        x, new_kv = _unrolled_layers(
            cfg, weights.layers, x, cache, (cos_g, sin_g), (cos_l, sin_l), full_mask, local_mask
        )
    else:

        def layer(carry, xs):
            x, kc, vc = carry
            lw, idx, sliding = xs
            written = []

            def keys_values(k, v):
                if kc is None:
                    return k, v
                # The new entries go into the loop-carried cache in place, and separately into this layer's
                # slice read before the write; when they fill the slice (a prefill) XLA skips the read entirely.
                k_at, v_at = (0, 0, 0, cache.length), (0, 0, cache.length, 0)
                written.append(jax.lax.dynamic_update_slice(kc, k[None].astype(kc.dtype), (idx, *k_at)))
                written.append(jax.lax.dynamic_update_slice(vc, v[None].astype(vc.dtype), (idx, *v_at)))
                k_all = jax.lax.dynamic_update_slice(kc[idx], k.astype(kc.dtype), k_at)
                v_all = jax.lax.dynamic_update_slice(vc[idx], v.astype(vc.dtype), v_at)
                return k_all.astype(dtype), v_all.astype(dtype)

            rope = (pick(sliding, cos_l, cos_g), pick(sliding, sin_l, sin_g))
            x = _layer(cfg, lw, x, rope, pick(sliding, local_mask, full_mask), keys_values)
            return (x, *(written or (kc, vc))), None

        kc0 = None if cache is None else cache.k
        vc0 = None if cache is None else cache.v
        if isinstance(kc0, tuple):
            raise ValueError("a per-layer cache needs per-layer weights (see decode_layout)")
        sliding_L = jnp.asarray([k == "sliding" for k in cfg.kinds])
        xs = (weights.layers, jnp.arange(cfg.num_layers), sliding_L)
        with jax.named_scope("layers"):
            (x, kc, vc), _ = jax.lax.scan(_remat(cfg, layer), (x, kc0, vc0), xs)
        new_kv = (kc, vc)
    x = _norm(cfg, x, weights.final_norm)
    new_cache = None
    if cache is not None:
        new_cache = KVCache(k=new_kv[0], v=new_kv[1], valid=k_valid, pos=k_pos, length=cache.length + T)
    return x, new_cache


def _unrolled_layers(
    cfg: ModelConfig,
    layers: tuple[LayerWeights, ...],
    x: Array,
    cache: KVCache | None,
    rope_global: tuple[Array, Array],
    rope_local: tuple[Array, Array],
    full_mask: Array,
    local_mask: Array,
) -> tuple[Array, tuple[Any, Any]]:
    """The layers of `decode_layout` weights one after another, with a per-layer cache (no stacked slices)."""
    if cache is not None and not isinstance(cache.k, tuple):
        cache = split_cache(cache)
    ks = None if cache is None else list(cache.k)
    vs = None if cache is None else list(cache.v)
    for i, (lw, kind) in enumerate(zip(layers, cfg.kinds)):

        def keys_values(k, v, i=i):
            if ks is None:
                return k, v
            ks[i] = jax.lax.dynamic_update_slice(ks[i], k.astype(ks[i].dtype), (0, 0, 0, cache.length))
            vs[i] = jax.lax.dynamic_update_slice(vs[i], v.astype(vs[i].dtype), (0, 0, cache.length, 0))
            return ks[i].astype(k.dtype), vs[i].astype(v.dtype)

        sliding = kind == "sliding"
        rope = rope_local if sliding else rope_global
        x = _layer(cfg, lw, x, rope, local_mask if sliding else full_mask, keys_values, out_major=_out_major())
    return x, (None, None) if ks is None else (tuple(ks), tuple(vs))


def _out_major() -> bool:
    """Whether `decode_layout` stores matrices output-major: on CPUs, where XLA's few-row matmul streams that
    orientation fastest; accelerators' matmuls take either orientation at full speed."""
    return jax.default_backend() == "cpu"


def decode_layout(weights: Weights) -> Weights:
    """The same weights as a tuple of per-layer blocks, for decoding a few rows at a time.

    `forward_hidden` runs these layers unrolled and reads each matrix in place, where a scan over stacked layers
    copies every layer's slice out on every step (as XLA does on CPUs and GPUs). On CPUs the matrices are also
    stored output-major ([*out, *in]), which XLA's matmul streams faster with few rows, with q, k and v stacked
    into `wq` and gate and up into `w_gate` (fewer, larger products; `wk`, `wv` and `w_up` are then None).
    Costs one copy of the layer weights.
    """
    L = weights.layers.wq.shape[0]
    transpose = _out_major()

    def one(i: int) -> LayerWeights:
        lw = jax.tree.map(lambda a: a[i], weights.layers)
        if not transpose:
            return lw
        out_in = lambda w: w.reshape(w.shape[0], -1).T  # [D, *out] -> [prod(out), D]
        return lw.replace(
            wq=jnp.concatenate([out_in(lw.wq), out_in(lw.wk), out_in(lw.wv)]),  # [(N + 2K) * H, D]
            wk=None,
            wv=None,
            wo=lw.wo.transpose(2, 0, 1),  # [D, N, H]
            w_gate=jnp.concatenate([lw.w_gate.T, lw.w_up.T]),  # [2F, D]
            w_up=None,
            w_down=lw.w_down.T,  # [D, F]
        )

    return weights.replace(layers=tuple(one(i) for i in range(L)))


def split_cache(cache: KVCache) -> KVCache:
    """The cache with per-layer key and value buffers (tuples of L arrays), as `decode_layout` weights use."""
    if isinstance(cache.k, tuple):
        return cache
    L = cache.k.shape[0]
    return cache.replace(k=tuple(cache.k[i] for i in range(L)), v=tuple(cache.v[i] for i in range(L)))


def lm_head(weights: Weights) -> Array:
    """Output embedding [V, D] (the input embedding when tied)."""
    return weights.embed if weights.lm_head is None else weights.lm_head


def logits_from_hidden(weights: Weights, cfg: ModelConfig, h_BxTxD: Array) -> Array:
    """Float32 logits [B, T, V] with the final soft-cap applied."""
    logits = jnp.einsum("btd,vd->btv", h_BxTxD, lm_head(weights), preferred_element_type=jnp.float32)
    return _softcap(logits, cfg.final_softcap)


def forward(
    weights: Weights,
    cfg: ModelConfig,
    tokens_BxT: Array,
    positions_BxT: Array,
    mask_BxT: Array,
    cache: KVCache | None = None,
) -> tuple[Array, KVCache | None]:
    """Float32 logits [B, T, V] for every position, plus the updated cache when one is given."""
    h, cache = forward_hidden(weights, cfg, tokens_BxT, positions_BxT, mask_BxT, cache)
    return logits_from_hidden(weights, cfg, h), cache
