"""One decoder-only transformer as pure functions over a weights pytree, in reading order: config, weights (and
`abstract`, their shapes, dtypes and logical axes), KV cache, layer functions, forward.

Config flags cover Llama 3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3 and OLMo 2; per-family code lives in
`families.py` and only translates configs and weight names. Layers are stacked on a leading axis and run as one
`lax.scan`; the per-layer layouts the sampler decodes with live in `decode_layout.py`. Arrays are placed by the
logical axes they carry (`sharding.py`) on the mesh their weights live on.

Einsum letters: b batch, t query positions, s key slots, d embed, n query heads, k K/V heads, g query heads per
K/V head, h head dim, f MLP hidden, v vocabulary, o and i a matrix's output and input.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cme_jax.models.sharding import ParamSpec, constrain, is_spec, mesh_of

Array = jax.Array
NormPlacement = Literal["pre", "sandwich", "post"]
QKNorm = Literal["none", "head", "full"]
Activation = Literal["silu", "gelu_tanh"]
RopeKind = Literal["default", "linear", "llama3"]
LayerKind = Literal["full", "sliding"]
Remat = Literal["none", "full", "dots"]

# Masked attention scores use a large finite value so fully padded query rows stay finite.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# Logical axes of the activations (see `sharding.RULES`).
X_AXES = ("batch", "sequence", "embed")
Q_AXES = ("batch", "sequence", "heads", "head_dim")
KV_AXES = ("batch", "sequence", "kv_heads", "head_dim")
MLP_AXES = ("batch", "sequence", "mlp")
LOGITS_AXES = ("batch", "sequence", "vocab")


# ----------------------------------------------------------------------------------------------------------
# Config


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
        return sum(math.prod(p.shape) for p in jax.tree.leaves(abstract(self), is_leaf=is_spec))


# ----------------------------------------------------------------------------------------------------------
# Weights


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
    layers: Any  # LayerWeights; a tuple of L per-layer blocks in the decode layouts (see `decode_layout`)
    final_norm: Any  # [D]
    lm_head: Any = None  # [V, D]; None when tied to embed


def abstract(cfg: ModelConfig, dtype: Any = jnp.float32) -> Weights:
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
    spec = lambda shape, *axes: ParamSpec(shape, axes, dtype)
    norm = spec((L, D), "layers", "norm")
    pre = cfg.norm_placement in ("pre", "sandwich")
    post = cfg.norm_placement in ("sandwich", "post")
    if cfg.qk_norm == "head":
        qn, kn = spec((L, H), "layers", "norm"), spec((L, H), "layers", "norm")
    elif cfg.qk_norm == "full":
        qn, kn = spec((L, N * H), "layers", "norm"), spec((L, K * H), "layers", "norm")
    else:
        qn = kn = None
    layers = LayerWeights(
        wq=spec((L, D, N, H), "layers", "embed", "heads", "head_dim"),
        wk=spec((L, D, K, H), "layers", "embed", "kv_heads", "head_dim"),
        wv=spec((L, D, K, H), "layers", "embed", "kv_heads", "head_dim"),
        wo=spec((L, N, H, D), "layers", "heads", "head_dim", "embed"),
        w_gate=spec((L, D, F), "layers", "embed", "mlp"),
        w_up=spec((L, D, F), "layers", "embed", "mlp"),
        w_down=spec((L, F, D), "layers", "mlp", "embed"),
        attn_in_norm=norm if pre else None,
        attn_out_norm=norm if post else None,
        mlp_in_norm=norm if pre else None,
        mlp_out_norm=norm if post else None,
        q_norm=qn,
        k_norm=kn,
        bq=spec((L, N, H), "layers", "heads", "head_dim") if cfg.qkv_bias else None,
        bk=spec((L, K, H), "layers", "kv_heads", "head_dim") if cfg.qkv_bias else None,
        bv=spec((L, K, H), "layers", "kv_heads", "head_dim") if cfg.qkv_bias else None,
    )
    return Weights(
        embed=spec((V, D), "vocab", "embed"),
        layers=layers,
        final_norm=spec((D,), "norm"),
        lm_head=None if cfg.tie_embeddings else spec((V, D), "vocab", "embed"),
    )


def init_weights(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32, std: float = 0.02) -> Weights:
    """Random weights (normal matrices, unit norm scales) for tests and benchmarks."""
    specs, treedef = jax.tree.flatten(abstract(cfg, dtype), is_leaf=is_spec)
    keys = jax.random.split(key, len(specs))
    leaves = []
    for spec, k in zip(specs, keys):
        if spec.axes[-1] == "norm":
            base = 0.0 if cfg.norm_plus_one else 1.0
            leaves.append((base + 0.1 * jax.random.normal(k, spec.shape)).astype(spec.dtype))
        else:
            leaves.append((std * jax.random.normal(k, spec.shape)).astype(spec.dtype))
    return jax.tree.unflatten(treedef, leaves)


# ----------------------------------------------------------------------------------------------------------
# KV cache


@struct.dataclass
class KVCache:
    """Keys and values for every layer plus per-slot bookkeeping shared by all layers."""

    k: Any  # [L, B, K, H, S] head-dim-major (see `attend`); a tuple of L [B, K, H, S] per-layer buffers
    v: Any  # [L, B, K, S, H] slot-major; or a tuple of L [B, K, S, H] (see `decode_layout.split_cache`)
    valid: Array  # [B, S] bool, slot holds a real token
    pos: Array  # [B, S] int32 rotary position of the token in the slot
    length: Array  # [] int32, slots written so far (same for every row)


K_CACHE_AXES = ("layers", "batch", "kv_heads", "head_dim", "cache_sequence")
V_CACHE_AXES = ("layers", "batch", "kv_heads", "cache_sequence", "head_dim")
SLOT_AXES = ("batch", "cache_sequence")


def cache_abstract(cfg: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """KVCache of ParamSpec leaves: a stacked cache with room for `length` tokens per row."""
    L, K, H = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    return KVCache(
        k=ParamSpec((L, batch, K, H, length), K_CACHE_AXES, dtype),
        v=ParamSpec((L, batch, K, length, H), V_CACHE_AXES, dtype),
        valid=ParamSpec((batch, length), SLOT_AXES, jnp.bool_),
        pos=ParamSpec((batch, length), SLOT_AXES, jnp.int32),
        length=ParamSpec((), (), jnp.int32),
    )


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache with room for `length` tokens per row."""
    specs = cache_abstract(cfg, batch, length, dtype)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs, is_leaf=is_spec)


def constrain_cache(cache: KVCache, mesh: Any) -> KVCache:
    """A stacked cache placed by the rules on `mesh`: rows over the batch axes, K/V heads over tensor."""
    return cache.replace(
        k=constrain(cache.k, K_CACHE_AXES, mesh),
        v=constrain(cache.v, V_CACHE_AXES, mesh),
        valid=constrain(cache.valid, SLOT_AXES, mesh),
        pos=constrain(cache.pos, SLOT_AXES, mesh),
    )


# ----------------------------------------------------------------------------------------------------------
# Layer functions


def rms_norm(x: Array, w: Array, eps: float, plus_one: bool) -> Array:
    """RMSNorm in float32; Gemma multiplies by (1 + w) before casting, Llama casts first."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    w = jnp.expand_dims(w, tuple(range(x.ndim - w.ndim)))  # [D] over x [..., D]
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
    ang = positions.astype(jnp.float32)[:, :, None] * inv[None, None, :]
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


def softcap(x: Array, cap: float | None) -> Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def _norm(cfg: ModelConfig, x: Array, w: Array | None) -> Array:
    return x if w is None else rms_norm(x, w, cfg.norm_eps, cfg.norm_plus_one)


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
    scores = softcap(scores * cfg.scale, cfg.attn_softcap)
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v_BxKxSxH)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


@struct.dataclass
class LowRank:
    """A frozen matrix with a low-rank update applied on the fly: x W + scale (x A) B (see `lora.adapted`).

    W is [*in, *out], A [*in, r] and B [r, *out], with any leading axes (the layer axis) shared by all three.
    """

    w: Any
    a: Any
    b: Any
    scale: float = struct.field(pytree_node=False, default=1.0)

    def merged(self) -> Array:
        """W + scale A B as one matrix in W's dtype."""
        lead = self.a.ndim + self.b.ndim - 2 - self.w.ndim
        rank = self.a.shape[-1]
        a = self.a.reshape(*self.a.shape[:lead], -1, rank)
        b = self.b.reshape(*self.b.shape[: lead + 1], -1)
        delta = jnp.matmul(a, b, preferred_element_type=jnp.float32).reshape(self.w.shape)
        return (self.w.astype(jnp.float32) + self.scale * delta).astype(self.w.dtype)


def is_low_rank(x: Any) -> bool:
    return isinstance(x, LowRank)


def merge_low_rank(tree: Any) -> Any:
    """`tree` with every LowRank replaced by its merged matrix (unchanged when it holds none)."""
    return jax.tree.map(lambda x: x.merged() if is_low_rank(x) else x, tree, is_leaf=is_low_rank)


def project(spec: str, x: Array, w: Any) -> Array:
    """einsum(spec, x, w) for a plain matrix, plus the low-rank term for a LowRank (x's trailing axes are W's
    inputs: the rank-r product never forms W + scale A B)."""
    if not is_low_rank(w):
        return jnp.einsum(spec, x, w)
    n_in = w.a.ndim - 1
    xa = jnp.tensordot(x, w.a.astype(x.dtype), n_in)
    return jnp.einsum(spec, x, w.w) + w.scale * jnp.tensordot(xa, w.b.astype(x.dtype), 1)


@dataclasses.dataclass(frozen=True)
class Projections:
    """How a layer applies its matrices: `EINSUM` for LayerWeights, `decode_layout.FUSED` for fused blocks."""

    qkv: Callable[[ModelConfig, Any, Array], tuple[Array, Array, Array]]  # h [B,T,D] -> q [B,T,N,H], k, v [B,T,K,H]
    out: Callable[[Any, Array], Array]  # attention [B, T, N, H] -> [B, T, D]
    gate_up: Callable[[Any, Array], tuple[Array, Array]]  # h [B, T, D] -> gate, up [B, T, F]
    down: Callable[[Any, Array], Array]  # [B, T, F] -> [B, T, D]


def _qkv_einsum(cfg: ModelConfig, lw: LayerWeights, h_BxTxD: Array) -> tuple[Array, Array, Array]:
    q = project("btd,dnh->btnh", h_BxTxD, lw.wq)
    k = project("btd,dkh->btkh", h_BxTxD, lw.wk)
    v = project("btd,dkh->btkh", h_BxTxD, lw.wv)
    return q, k, v


# Any matrix of a LayerWeights may be a LowRank (see `project`).
EINSUM = Projections(
    qkv=_qkv_einsum,
    out=lambda lw, a_BxTxNxH: project("btnh,nhd->btd", a_BxTxNxH, lw.wo),
    gate_up=lambda lw, h: (project("btd,df->btf", h, lw.w_gate), project("btd,df->btf", h, lw.w_up)),
    down=lambda lw, y_BxTxF: project("btf,fd->btd", y_BxTxF, lw.w_down),
)


def _qk_bias_and_norm(cfg: ModelConfig, lw: Any, q: Array, k: Array, v: Array) -> tuple[Array, Array, Array]:
    if cfg.qkv_bias:
        q, k, v = q + lw.bq[None, None], k + lw.bk[None, None], v + lw.bv[None, None]  # [N, H] over [B, T, N, H]
    if cfg.qk_norm == "head":
        q = rms_norm(q, lw.q_norm, cfg.norm_eps, cfg.norm_plus_one)
        k = rms_norm(k, lw.k_norm, cfg.norm_eps, cfg.norm_plus_one)
    elif cfg.qk_norm == "full":
        B, T, N, H = q.shape
        q = rms_norm(q.reshape(B, T, N * H), lw.q_norm, cfg.norm_eps, cfg.norm_plus_one).reshape(q.shape)
        k = rms_norm(k.reshape(B, T, -1), lw.k_norm, cfg.norm_eps, cfg.norm_plus_one).reshape(k.shape)
    return q, k, v


def layer(
    cfg: ModelConfig,
    lw: Any,
    x_BxTxD: Array,
    rope: tuple[Array, Array],
    mask_BxTxS: Array,
    keys_values: Callable[[Array, Array], tuple[Array, Array]],
    mesh: Any,
    proj: Projections = EINSUM,
) -> Array:
    """One decoder block of one layer's weights `lw`.

    `keys_values` takes this step's keys [B, K, H, T] and values [B, K, T, H] (writing them to a cache when there
    is one) and returns the keys and values to attend to.
    """
    h = _norm(cfg, x_BxTxD, lw.attn_in_norm)
    q, k, v = _qk_bias_and_norm(cfg, lw, *proj.qkv(cfg, lw, h))
    q = constrain(apply_rope(q, *rope), Q_AXES, mesh)
    k = constrain(apply_rope(k, *rope), KV_AXES, mesh)
    v = constrain(v, KV_AXES, mesh)
    k_all, v_all = keys_values(k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3))  # [B, K, H, T], [B, K, T, H]
    # Under differentiation the [B, N, T, S] scores and probabilities are recomputed in the backward pass rather
    # than saved for every layer (64 rows x 384 tokens of a 24-layer model would keep over 30 GiB of them).
    a = jax.checkpoint(lambda *qkvm: attend(cfg, *qkvm))(q, k_all, v_all, mask_BxTxS)
    a = constrain(a, Q_AXES, mesh)
    x = constrain(x_BxTxD + _norm(cfg, proj.out(lw, a), lw.attn_out_norm), X_AXES, mesh)
    h = _norm(cfg, x, lw.mlp_in_norm)
    gate, up = proj.gate_up(lw, h)
    y = constrain(_activation(cfg, gate) * up, MLP_AXES, mesh)
    return constrain(x + _norm(cfg, proj.down(lw, y), lw.mlp_out_norm), X_AXES, mesh)


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


def embed_tokens(cfg: ModelConfig, weights: Weights, tokens_BxT: Array) -> Array:
    x = jnp.take(weights.embed, tokens_BxT, axis=0)
    if cfg.embed_scale:
        x = x * jnp.asarray(math.sqrt(cfg.dim), jnp.float32).astype(x.dtype)
    return x


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What each layer reads besides its weights: rotary tables and attention masks by layer kind, and the key
    slots' validity and positions once this call's tokens are written."""

    rope: Mapping[LayerKind, tuple[Array, Array]]  # cos, sin [B, T, H]
    mask: Mapping[LayerKind, Array]  # [B, T, S]
    k_valid_BxS: Array
    k_pos_BxS: Array


def layer_inputs(cfg: ModelConfig, positions_BxT: Array, mask_BxT: Array, cache: KVCache | None) -> LayerInputs:
    """Rotary tables and masks for the layer kinds the model has (a kind it lacks shares the other's)."""
    T = positions_BxT.shape[1]
    kinds = set(cfg.kinds)
    window = cfg.sliding_window
    rope_full = rope_tables(cfg.rope, cfg.head_dim, positions_BxT)
    rope_local = rope_full
    if cfg.rope_local is not None and "sliding" in kinds:
        rope_local = rope_tables(cfg.rope_local, cfg.head_dim, positions_BxT)
    if cache is None:
        q_slot = jnp.arange(T)
        k_valid, k_pos = mask_BxT, positions_BxT
    else:
        start = cache.length
        q_slot = start + jnp.arange(T)
        k_valid = jax.lax.dynamic_update_slice(cache.valid, mask_BxT, (0, start))
        k_pos = jax.lax.dynamic_update_slice(cache.pos, positions_BxT.astype(jnp.int32), (0, start))
    full = attention_mask(q_slot, positions_BxT, k_valid, k_pos, None) if "full" in kinds or not window else None
    local = attention_mask(q_slot, positions_BxT, k_valid, k_pos, window) if "sliding" in kinds and window else None
    full = local if full is None else full
    local = full if local is None else local
    return LayerInputs({"full": rope_full, "sliding": rope_local}, {"full": full, "sliding": local}, k_valid, k_pos)


def finish(
    cfg: ModelConfig, weights: Weights, x: Array, cache: KVCache | None, inputs: LayerInputs, k: Any, v: Any, mesh: Any
) -> tuple[Array, KVCache | None]:
    """The final norm, and the cache holding the layers' keys `k` and values `v` (None without a cache)."""
    x = constrain(_norm(cfg, x, weights.final_norm), X_AXES, mesh)
    if cache is None:
        return x, None
    return x, KVCache(k=k, v=v, valid=inputs.k_valid_BxS, pos=inputs.k_pos_BxS, length=cache.length + x.shape[1])


def forward_hidden(
    weights: Weights,
    cfg: ModelConfig,
    tokens_BxT: Array,
    positions_BxT: Array,
    mask_BxT: Array,
    cache: KVCache | None = None,
) -> tuple[Array, KVCache | None]:
    """Final-normed hidden states [B, T, D] of stacked weights, the layers run as a scan; with a (stacked) cache,
    the T tokens are appended at cache.length."""
    mesh = mesh_of(weights.embed)
    mask_BxT = mask_BxT.astype(bool)
    x = constrain(embed_tokens(cfg, weights, tokens_BxT), X_AXES, mesh)
    dtype = x.dtype
    inputs = layer_inputs(cfg, positions_BxT, mask_BxT, cache)
    kinds = set(cfg.kinds)

    def pick(sliding: Array, by_kind: Mapping[LayerKind, Any]) -> Any:
        if len(kinds) == 1:  # only a model with both kinds picks at run time
            return by_kind["sliding" if kinds == {"sliding"} else "full"]
        return jax.tree.map(lambda local, full: jnp.where(sliding, local, full), by_kind["sliding"], by_kind["full"])

    def layer_step(carry, xs):
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

        x = layer(cfg, lw, x, pick(sliding, inputs.rope), pick(sliding, inputs.mask), keys_values, mesh)
        return (x, *(written or (kc, vc))), None

    kc0 = None if cache is None else cache.k
    vc0 = None if cache is None else cache.v
    sliding_L = jnp.asarray([k == "sliding" for k in cfg.kinds])
    xs = (weights.layers, jnp.arange(cfg.num_layers), sliding_L)
    with jax.named_scope("layers"):
        (x, kc, vc), _ = jax.lax.scan(_remat(cfg, layer_step), (x, kc0, vc0), xs)
    x, new_cache = finish(cfg, weights, x, cache, inputs, kc, vc, mesh)
    return x, None if new_cache is None else constrain_cache(new_cache, mesh)


def lm_head(weights: Weights) -> Array:
    """Output embedding [V, D] (the input embedding when tied)."""
    return weights.embed if weights.lm_head is None else weights.lm_head


def logits_from_hidden(weights: Weights, cfg: ModelConfig, h_BxTxD: Array) -> Array:
    """Float32 logits [B, T, V] with the final soft-cap applied."""
    logits = jnp.einsum("btd,vd->btv", h_BxTxD, lm_head(weights), preferred_element_type=jnp.float32)
    return softcap(constrain(logits, LOGITS_AXES, mesh_of(weights.embed)), cfg.final_softcap)


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
