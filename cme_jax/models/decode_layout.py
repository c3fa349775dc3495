"""Decode layouts: the model's weights rearranged for decoding a few rows per step, the forward that reads them, and
the backend heuristics that choose one.

- "stacked": the weights as stored, layers on a leading [L] axis, run as a scan (`transformer.forward_hidden`).
- "per_layer": a tuple of L `LayerWeights` blocks run unrolled (`forward_unrolled`), each matrix read in place;
  a scan over stacked layers copies every layer's slice out on every step (as XLA does on CPUs and GPUs).
- "fused": per-layer `FusedLayer` blocks for CPUs, each matrix stored output-major ([*out, *in]), q, k and v
  stacked into one matrix and gate and up into another (fewer, larger products in the orientation XLA's CPU
  matmul streams fastest with few rows).

`abstract(cfg, layout)` describes every layout's weights (shapes, dtypes, logical axes), so their shardings come
from the same rules table as the stored weights (`sharding.weight_shardings(cfg, mesh, layout)`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from flax import struct

from cme_jax.models import transformer
from cme_jax.models.sharding import ParamSpec, constrain, constrain_like, is_spec, mesh_of
from cme_jax.models.transformer import (
    EINSUM,
    K_CACHE_AXES,
    SLOT_AXES,
    V_CACHE_AXES,
    X_AXES,
    Array,
    KVCache,
    ModelConfig,
    Projections,
    Weights,
    embed_tokens,
    finish,
    layer,
    layer_inputs,
)

Layout = Literal["stacked", "per_layer", "fused"]
# What callers ask for: "per_layer" decodes per layer in the backend's orientation, "auto" picks for the backend.
LayoutChoice = Literal["auto", "per_layer", "stacked"]

# Above this many rows (tokens x batch) the out-major product's transposed result costs its consumers more than
# the orientation saves in the matmul (measured on a 2-core x86 CPU: 48 rows break even, 64 run 1.25x faster).
_OUT_MAJOR_MAX_ROWS = 48


def resolve(choice: LayoutChoice, backend: str | None = None) -> Layout:
    """The layout a choice decodes with on `backend` ("cpu", "gpu", "tpu"; default: this machine's).

    "auto" decodes per layer except on TPUs, whose compiler reads stacked layers in place; on CPUs and GPUs the
    scan copies each layer's weights and cache out every step (per-layer decoding ran 1.8x faster on an H200,
    2-3x on a CPU) at the price of a second copy of the layer weights while sampling. Per-layer decoding is
    "fused" on CPUs, where XLA's few-row matmul streams output-major matrices fastest; accelerators' matmuls take
    either orientation at full speed.
    """
    backend = backend or jax.default_backend()
    if choice == "stacked" or (choice == "auto" and backend == "tpu"):
        return "stacked"
    return "fused" if backend == "cpu" else "per_layer"


# ----------------------------------------------------------------------------------------------------------
# Weights of each layout


@struct.dataclass
class FusedLayer:
    """One layer of the "fused" layout; norms, biases and their shapes as in `LayerWeights`."""

    wqkv: Any  # [(N + 2K) * H, D]: q, k and v output rows stacked
    wo: Any  # [D, N, H]
    w_gate_up: Any  # [2F, D]: gate and up output rows stacked
    w_down: Any  # [D, F]
    attn_in_norm: Any = None
    attn_out_norm: Any = None
    mlp_in_norm: Any = None
    mlp_out_norm: Any = None
    q_norm: Any = None
    k_norm: Any = None
    bq: Any = None
    bk: Any = None
    bv: Any = None


_SHARED = ("attn_in_norm", "attn_out_norm", "mlp_in_norm", "mlp_out_norm", "q_norm", "k_norm", "bq", "bk", "bv")


def abstract(cfg: ModelConfig, layout: Layout = "stacked", dtype: Any = jnp.float32) -> Weights:
    """Weights pytree of ParamSpec leaves for `layout`: `transformer.abstract` with the layers rearranged."""
    if layout not in get_args(Layout):
        raise ValueError(f"layout={layout!r}; choose one of {get_args(Layout)}")
    stacked = transformer.abstract(cfg, dtype)
    if layout == "stacked":
        return stacked
    one = jax.tree.map(lambda s: ParamSpec(s.shape[1:], s.axes[1:], s.dtype), stacked.layers, is_leaf=is_spec)
    if layout == "fused":
        D, N, K, H, F = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
        one = FusedLayer(
            wqkv=ParamSpec(((N + 2 * K) * H, D), ("fused", "embed"), dtype),
            wo=ParamSpec((D, N, H), ("embed", "heads", "head_dim"), dtype),
            w_gate_up=ParamSpec((2 * F, D), ("fused", "embed"), dtype),
            w_down=ParamSpec((D, F), ("embed", "mlp"), dtype),
            **{name: getattr(one, name) for name in _SHARED},
        )
    return stacked.replace(layers=(one,) * cfg.num_layers)


def to_layout(weights: Weights, cfg: ModelConfig, layout: Layout) -> Weights:
    """Stacked `weights` rearranged into `layout`, placed by the rules on the weights' mesh, with low-rank
    adapters (`transformer.LowRank`) merged in.

    Costs one copy of the layer weights (none for "stacked" without adapters). Adapters merge layer by layer, so
    the merged layers are that one copy.
    """
    if layout == "stacked":
        return transformer.merge_low_rank(weights)

    def one(i: int) -> Any:
        lw = transformer.merge_low_rank(jax.tree.map(lambda a: a[i], weights.layers))
        if layout == "per_layer":
            return lw
        out_in = lambda w: w.reshape(w.shape[0], -1).T  # [D, *out] -> [prod(out), D]
        return FusedLayer(
            wqkv=jnp.concatenate([out_in(lw.wq), out_in(lw.wk), out_in(lw.wv)]),
            wo=lw.wo.transpose(2, 0, 1),
            w_gate_up=jnp.concatenate([lw.w_gate.T, lw.w_up.T]),
            w_down=lw.w_down.T,
            **{name: getattr(lw, name) for name in _SHARED},
        )

    layers = tuple(one(i) for i in range(cfg.num_layers))
    layers = constrain_like(layers, abstract(cfg, layout).layers, mesh_of(weights.embed))
    return weights.replace(layers=layers)


def gather_width(weights: Weights, cfg: ModelConfig, layout: Layout) -> Weights:
    """`weights` of `layout` with the model width whole (split over tensor, not over fsdp) in the arrays every decode
    step reads in full: the LM head and, in the per-layer layouts, the layers.

    Decode steps split their rows over fsdp, so each step needs whole weights. Left to XLA, the gathers of these
    loop-invariant weights are hoisted out of the decode loop, once per loop: one copy of every layer for each cache
    stage. Gathered here, they are held once. The stacked layout's scan still gathers one layer at a time.
    """
    mesh = mesh_of(weights.embed)
    whole = lambda s: ParamSpec(s.shape, tuple(None if a == "embed" else a for a in s.axes), s.dtype)
    specs = jax.tree.map(whole, abstract(cfg, layout), is_leaf=is_spec)
    head = "embed" if weights.lm_head is None else "lm_head"
    out = {head: constrain(getattr(weights, head), getattr(specs, head).axes, mesh)}
    if layout != "stacked":
        out["layers"] = constrain_like(weights.layers, specs.layers, mesh)
    return weights.replace(**out)


# ----------------------------------------------------------------------------------------------------------
# Products of the fused layout


def _out_major(x_BxTx_I: Array, w_Ox_I: Array) -> Array:
    """`x` times a matrix stored output-major as [*out, *in] (the input axes are x's after b and t)."""
    lead, in_shape = x_BxTx_I.shape[:2], x_BxTx_I.shape[2:]
    out_shape = w_Ox_I.shape[: w_Ox_I.ndim - len(in_shape)]
    w_OxI, x_MxI = w_Ox_I.reshape(-1, math.prod(in_shape)), x_BxTx_I.reshape(-1, math.prod(in_shape))
    if x_MxI.shape[0] > _OUT_MAJOR_MAX_ROWS:
        return jnp.einsum("oi,mi->mo", w_OxI, x_MxI).reshape(*lead, *out_shape)
    # With few rows XLA's CPU matmul runs this orientation fastest; the barrier keeps the transpose from being
    # folded back into the product. With more rows the transposed reads in the consumers cost more than it saves.
    y_OxM = jnp.einsum("oi,mi->om", w_OxI, x_MxI)
    return jax.lax.optimization_barrier(y_OxM).T.reshape(*lead, *out_shape)


def _fused_qkv(cfg: ModelConfig, lw: FusedLayer, h_BxTxD: Array) -> tuple[Array, Array, Array]:
    B, T, _ = h_BxTxD.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = _out_major(h_BxTxD, lw.wqkv)
    q = qkv[..., : N * H].reshape(B, T, N, H)
    k = qkv[..., N * H : (N + K) * H].reshape(B, T, K, H)
    v = qkv[..., (N + K) * H :].reshape(B, T, K, H)
    return q, k, v


FUSED = Projections(
    qkv=_fused_qkv,
    out=lambda lw, a_BxTxNxH: _out_major(a_BxTxNxH, lw.wo),
    gate_up=lambda lw, h_BxTxD: tuple(jnp.split(_out_major(h_BxTxD, lw.w_gate_up), 2, axis=-1)),
    down=lambda lw, y_BxTxF: _out_major(y_BxTxF, lw.w_down),
)


# ----------------------------------------------------------------------------------------------------------
# Per-layer cache and the unrolled forward


def split_cache(cache: KVCache) -> KVCache:
    """A stacked cache as per-layer key and value buffers (tuples of L arrays), as the unrolled forward reads."""
    L = cache.k.shape[0]
    return cache.replace(k=tuple(cache.k[i] for i in range(L)), v=tuple(cache.v[i] for i in range(L)))


def constrain_cache(cache: KVCache, mesh: Any, layout: Layout) -> KVCache:
    """A cache of `layout` (stacked buffers, or per-layer ones for the others) placed by the rules on `mesh`."""
    if layout == "stacked":
        return transformer.constrain_cache(cache, mesh)
    return cache.replace(
        k=tuple(constrain(k, K_CACHE_AXES[1:], mesh) for k in cache.k),
        v=tuple(constrain(v, V_CACHE_AXES[1:], mesh) for v in cache.v),
        valid=constrain(cache.valid, SLOT_AXES, mesh),
        pos=constrain(cache.pos, SLOT_AXES, mesh),
    )


def forward_unrolled(
    weights: Weights,
    cfg: ModelConfig,
    layout: Layout,
    tokens_BxT: Array,
    positions_BxT: Array,
    mask_BxT: Array,
    cache: KVCache | None = None,
) -> tuple[Array, KVCache | None]:
    """`transformer.forward_hidden` for "per_layer" or "fused" weights: the layers one after another, each with
    its own cache buffers (`split_cache`), so no step copies a layer's weights or cache out of a stack."""
    mesh = mesh_of(weights.embed)
    proj = FUSED if layout == "fused" else EINSUM
    mask_BxT = mask_BxT.astype(bool)
    x = constrain(embed_tokens(cfg, weights, tokens_BxT), X_AXES, mesh)
    inputs = layer_inputs(cfg, positions_BxT, mask_BxT, cache)
    ks = None if cache is None else list(cache.k)
    vs = None if cache is None else list(cache.v)
    for i, (lw, kind) in enumerate(zip(weights.layers, cfg.kinds)):

        def keys_values(k, v, i=i):
            if ks is None:
                return k, v
            ks[i] = jax.lax.dynamic_update_slice(ks[i], k.astype(ks[i].dtype), (0, 0, 0, cache.length))
            vs[i] = jax.lax.dynamic_update_slice(vs[i], v.astype(vs[i].dtype), (0, 0, cache.length, 0))
            return ks[i].astype(k.dtype), vs[i].astype(v.dtype)

        x = layer(cfg, lw, x, inputs.rope[kind], inputs.mask[kind], keys_values, mesh, proj)
    k_all = None if ks is None else tuple(ks)
    v_all = None if vs is None else tuple(vs)
    x, new_cache = finish(cfg, weights, x, cache, inputs, k_all, v_all, mesh)
    return x, None if new_cache is None else constrain_cache(new_cache, mesh, layout)
