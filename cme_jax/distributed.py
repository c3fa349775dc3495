"""Multi-process helpers: joining the job, global arrays from host data, host copies of global arrays, agreement."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from cme_jax.errors import CmeError


def initialize_distributed() -> None:
    """Join the multi-process job: explicit JAX_* variables if set, else JAX's cluster auto-detection."""
    # CPU processes (tests, launch/local_multiprocess.py) need cross-process collectives: gloo (JAX's default
    # in recent releases) unless JAX_CPU_COLLECTIVES_IMPLEMENTATION chose another.
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # How long a silent process counts as alive: when one dies, the others stop after this long (JAX's default
    # unless CME_JAX_HEARTBEAT_TIMEOUT says otherwise; the local launcher stops them itself and sets it long).
    kw: dict[str, Any] = {}
    if heartbeat := os.environ.get("CME_JAX_HEARTBEAT_TIMEOUT"):
        if not heartbeat.isdigit() or int(heartbeat) < 1:
            raise CmeError(f"CME_JAX_HEARTBEAT_TIMEOUT={heartbeat!r}: give a whole number of seconds >= 1")
        kw["heartbeat_timeout_seconds"] = int(heartbeat)
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        try:
            n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise CmeError("JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID") from None
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid, **kw)
    else:
        jax.distributed.initialize(**kw)


def put_global(x: Any, sharding: jax.sharding.Sharding, fed: set[int] | None = None) -> jax.Array:
    """A global array from a value every process holds in full; each process transfers only its own shards.

    `fed` (host data only) collects the leading-axis indices this process transferred.
    """
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # A process-local key (device_put refuses those across processes) travels as its raw words.
        return jax.random.wrap_key_data(put_global(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    x = np.asarray(x)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if fed is not None:
            fed.update(range(x.shape[0])[index[0]])
        return x[index]

    return jax.make_array_from_callback(x.shape, sharding, shard)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) global array on this host."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(sharding: jax.sharding.Sharding, n: int) -> list[int]:
    """Rows of an [n, ...] array that live on this process's devices: the share this process feeds."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((n,)).values():
        rows.update(range(n)[index[0]])
    return sorted(rows)


def agree(flag: bool) -> bool:
    """Process 0's decision on every process; a collective, so every process must call it at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32))))


def from_process_0(tree: Any) -> Any:
    """Process 0's numpy arrays on every process (the others pass arrays of the same shapes and dtypes); a
    collective, so every process must call it at the same step."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def data_shards(mesh: Any) -> int:
    """How many ways the mesh splits rows (its data axes): batches of rows come in multiples of this."""
    if mesh is None:
        return 1
    from cme_jax.models.sharding import batch_sharding

    spec = batch_sharding(mesh, 2).spec[0]
    names = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
    return int(np.prod([mesh.shape[a] for a in names])) if names else 1


def any_process(flag: bool) -> bool:
    """Whether the flag is set on any process; a collective, so every process must call it at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(flag, np.int32))).any())
