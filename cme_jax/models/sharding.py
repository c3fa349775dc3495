"""The one sharding vocabulary: logical axis names, the rules table that maps them to mesh axes, the mesh itself,
and the placement of weights, activations and the KV cache by those names.

Model code names logical axes only (`ParamSpec.axes` for arrays it stores, `constrain` for the ones it computes);
`RULES` decides which mesh axes split them. Activations and the cache follow the mesh their weights live on
(`mesh_of`), so functions of (weights, inputs) need no mesh argument.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from cme_jax.errors import CmeError

Array = jax.Array
MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None

# Logical axis -> mesh axes. Model code names only the left column.
RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "sequence": None,
    "cache_sequence": None,
    "layers": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "lora_rank": None,  # LoRA adapters: the rank is small and stays whole
    # The fused decode projections stack outputs of different kinds (q, k and v heads; gate and up) on one axis,
    # which a contiguous split over devices would cut across kinds.
    "fused": None,
}
# Grouped-query attention with fewer K/V heads than tensor shards keeps whole K/V heads on every shard (each
# shard's query heads need theirs); any other dimension the mesh does not divide is an error.
_WHOLE_WHEN_FEWER = frozenset({"kv_heads"})
# Sizes set by the data rather than the model (rows, tokens): a batch the mesh does not divide is left to the
# partitioner instead of failing mid-trace. Model dimensions are checked when weights are placed.
_DATA_AXES = frozenset({"batch", "sequence", "cache_sequence"})

_NO_MESH = AbstractMesh((), ())


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, dtype and logical axis names of one array: the leaves of weight and cache descriptions."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: Any = jnp.float32

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in length")


def is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


# ----------------------------------------------------------------------------------------------------------
# The mesh


def mesh_sizes(data: int, fsdp: int, tensor: int, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for this many devices; one size may be -1 to take what the others leave."""
    sizes = [data, fsdp, tensor]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise CmeError(f"mesh sizes {tuple(sizes)} must be >= 1, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise CmeError(f"mesh {tuple(sizes)} does not divide the {device_count} visible devices")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise CmeError(
            f"mesh data*fsdp*tensor = {math.prod(sizes)} but {device_count} devices are visible; "
            "set mesh sizes whose product is the device count"
        )
    return sizes[0], sizes[1], sizes[2]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 to take what is left."""
    devices = list(jax.devices() if devices is None else devices)
    grid = np.asarray(devices, dtype=object).reshape(mesh_sizes(data, fsdp, tensor, len(devices)))
    return Mesh(grid, MESH_AXES)


def mesh_of(x: Any) -> Mesh | AbstractMesh:
    """The mesh an array or tracer is placed on; an empty mesh for one device."""
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        sharding = x.sharding
    else:
        sharding = getattr(jax.typeof(x), "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else _NO_MESH


# ----------------------------------------------------------------------------------------------------------
# Logical axes -> shardings


def _rule_axes(name: str | None, mesh: Mesh | AbstractMesh, used: set[str]) -> tuple[str, ...]:
    """The mesh axes of size > 1 the rules give `name`, less those an earlier dimension took."""
    mapped = None if name is None else RULES[name]
    names = () if mapped is None else ((mapped,) if isinstance(mapped, str) else tuple(mapped))
    return tuple(a for a in names if mesh.shape.get(a, 1) > 1 and a not in used)


def logical_spec(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """PartitionSpec of an array by the rules; CmeError naming the dimension and the mesh axis when the mesh does
    not divide a model dimension it shards. A mesh axis goes to the first dimension that asks for it."""
    used: set[str] = set()
    out: list[Any] = []
    for dim, name in zip(shape, axes, strict=True):
        names = _rule_axes(name, mesh, used)
        size = math.prod(mesh.shape[a] for a in names)
        if size == 1 or (name in _WHOLE_WHEN_FEWER and dim < size):
            out.append(None)
            continue
        if dim % size == 0:
            out.append(names[0] if len(names) == 1 else names)
        elif name in _DATA_AXES:
            out.append(PartitionSpec.UNCONSTRAINED)
        else:
            where = " x ".join(f"{a}={mesh.shape[a]}" for a in names)
            raise CmeError(
                f"{name}={dim} does not split over mesh axis {where}; choose mesh sizes that divide {dim} "
                f"(mesh.{names[0]}=1 keeps {name} whole)"
            )
        used.update(names)
    return PartitionSpec(*out)


def param_shardings(specs: Any, mesh: Mesh) -> Any:
    """A pytree of NamedShardings for a pytree of ParamSpecs (weights of any layout, a cache)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_spec(s.shape, s.axes, mesh)), specs, is_leaf=is_spec)


def weight_shardings(cfg: Any, mesh: Mesh, *, layout: str = "stacked") -> Any:
    """A Weights pytree of NamedShardings for `cfg`'s weights in `layout` (see `decode_layout.abstract`), from the
    same description used for init and restore; CmeError when the mesh does not divide a dimension it shards."""
    from cme_jax.models import decode_layout  # the model imports this module for its vocabulary

    return param_shardings(decode_layout.abstract(cfg, layout), mesh)


def constrain(x: Array, axes: Sequence[str | None], mesh: Mesh | AbstractMesh) -> Array:
    """x with its sharding fixed by the rules for its logical axes; unchanged on an empty mesh (one device)."""
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(x.shape, axes, mesh)))


def constrain_like(tree: Any, specs: Any, mesh: Mesh | AbstractMesh) -> Any:
    """Every array of `tree` constrained by the axes of the matching ParamSpec in `specs`."""
    return jax.tree.map(lambda s, x: constrain(x, s.axes, mesh), specs, tree, is_leaf=is_spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over the batch axes, everything else replicated (shape-independent form for inputs)."""
    names = _rule_axes("batch", mesh, set())
    lead: MeshAxes = None if not names else (names[0] if len(names) == 1 else names)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
