"""The one sharding vocabulary: logical axis names, a rules table to mesh axes, and the mesh itself."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cme_jax.models.transformer import ModelConfig, _is_spec, abstract

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None

# Logical axis -> mesh axes. Model code names only the left column.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "sequence": None,
    "layers": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "cache_sequence": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one size may be -1 to take what is left."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh sizes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} devices are visible; "
            "set mesh sizes whose product is the device count"
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def _mesh_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in names)


def logical_spec(
    shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None
) -> PartitionSpec:
    """PartitionSpec for a logical layout, replicating any dim the mesh does not divide evenly."""
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in zip(shape, axes):
        mapped = rules.get(name) if name is not None else None
        names = () if mapped is None else ((mapped,) if isinstance(mapped, str) else tuple(mapped))
        # Drop mesh axes of size 1 or already used, then require an even split.
        names = tuple(a for a in names if mesh.shape.get(a, 1) > 1 and a not in used)
        if not names or dim % _mesh_size(mesh, names):
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def logical_sharding(
    shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(shape, axes, mesh, rules))


def weight_shardings(cfg: ModelConfig, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None) -> Any:
    """A Weights pytree of NamedShardings, from the same `abstract(cfg)` used for init and restore."""
    return jax.tree.map(lambda s: logical_sharding(s.shape, s.axes, mesh, rules), abstract(cfg), is_leaf=_is_spec)


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, MeshAxes] | None = None) -> NamedSharding:
    """Rows over the data axes, everything else replicated (shape-independent form for inputs)."""
    rules = DEFAULT_RULES if rules is None else rules
    batch = rules.get("batch")
    names = () if batch is None else ((batch,) if isinstance(batch, str) else tuple(batch))
    names = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    lead: MeshAxes = None if not names else (names[0] if len(names) == 1 else names)
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
