"""Training checkpoints: async orbax saves of a state pytree plus a JSON metadata dict, restore, preemption.

Run directory layout (one directory per saved step, written by all processes together):

    RUN_DIR/checkpoints/<step>/state/               the state pytree (orbax PyTree, OCDBT)
    RUN_DIR/checkpoints/<step>/meta/metadata.json   the metadata dict (data position, model spec, config, ...)
    RUN_DIR/checkpoints/<step>/meta/config.yaml     metadata["config"], human-readable, when present

A step directory exists under its final name only once every file of it is written: orbax writes into
`<step>.orbax-checkpoint-tmp*` and renames it on finalisation, and step listing ignores those, so a run
killed mid-save resumes from the last complete step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from cme_jax.errors import CmeError
from cme_jax.models.sharding import is_spec
from cme_jax.models.transformer import ModelConfig, Weights, abstract
from cme_jax.scoring import VerifierDtype, resolve_dtype
from cme_jax.sources import LoadedModel, load_model, load_tokenizer, resolve

CHECKPOINTS = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.yaml"


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run's step directories live."""
    return Path(run_dir) / CHECKPOINTS


# ----------------------------------------------------------------------------------------------------------
# Metadata item: small JSON written by process 0 only.


class MetadataHandler(ocp.CheckpointHandler):
    """Writes the metadata dict as metadata.json and its "config" entry as config.yaml."""

    def save(self, directory: Any, args: MetadataSave) -> None:
        if jax.process_index() != 0:
            return
        directory = Path(directory)
        (directory / METADATA_FILE).write_text(json.dumps(args.metadata, indent=2))
        config = args.metadata.get("config")
        if config is not None:
            (directory / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))

    def restore(self, directory: Any, args: MetadataRestore | None = None) -> dict[str, Any]:
        return json.loads((Path(directory) / METADATA_FILE).read_text())


@ocp.args.register_with_handler(MetadataHandler, for_save=True)
@dataclasses.dataclass
class MetadataSave(ocp.args.CheckpointArgs):
    metadata: dict[str, Any]


@ocp.args.register_with_handler(MetadataHandler, for_restore=True)
@dataclasses.dataclass
class MetadataRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------------------------------------
# Typed PRNG keys are stored as their raw key data (uint32), which every orbax version can write; the
# restoring run's abstract state says which leaves are keys and of which implementation.


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _key_impl(abstract_key: jax.ShapeDtypeStruct) -> Any:
    impl: list[Any] = []

    def probe(k):
        impl.append(jax.random.key_impl(k))
        return k

    jax.eval_shape(probe, jax.ShapeDtypeStruct(abstract_key.shape, abstract_key.dtype))
    return impl[0]


def _key_data_sharding(sharding: Any, key_ndim: int, data_ndim: int) -> Any:
    """The sharding of key_data(k) for a key array k with `sharding`: trailing key words replicated."""
    if sharding is None or isinstance(sharding, SingleDeviceSharding):
        return sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (key_ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec, *([None] * (data_ndim - key_ndim))))
    raise TypeError(f"cannot restore a PRNG key with a {type(sharding).__name__}; use a NamedSharding")


def _as_abstract(x: Any) -> Any:
    """ShapeDtypeStruct of an abstract leaf; real arrays count as templates of themselves."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    raise TypeError(f"abstract state leaves must be jax.ShapeDtypeStruct or jax.Array, got {type(x).__name__}")


def _abstract_key_data(x: Any) -> Any:
    x = _as_abstract(x)
    if not _is_key(x):
        return x
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = _key_data_sharding(x.sharding, len(x.shape), len(data.shape))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _rewrap_keys(abstract_state: Any, restored: Any) -> Any:
    def wrap(a, r):
        a = _as_abstract(a)
        return jax.random.wrap_key_data(r, impl=_key_impl(a)) if _is_key(a) else r

    return jax.tree.map(wrap, abstract_state, restored)


# ----------------------------------------------------------------------------------------------------------


class Restored(NamedTuple):
    step: int
    state: Any
    metadata: dict[str, Any]


class CheckpointManager:
    """Async, multi-process checkpoints of (state pytree, metadata dict) under RUN_DIR/checkpoints/<step>/.

    Every process calls `save` and `restore` with its own shards (orbax coordinates the writes);
    the metadata files are written by process 0.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        save_every: int = 1,
        keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if save_every < 1:
            raise CmeError(f"checkpoint save interval must be >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise CmeError(f"number of checkpoints to keep must be >= 1 (or unlimited), got {keep}")
        self.run_dir = Path(run_dir)
        self.directory = checkpoint_dir(run_dir)
        self.save_every = save_every
        if read_only and not self.directory.is_dir():
            raise CmeError(f"{self.directory} does not exist; is {self.run_dir} a training run directory?")
        self.read_only = read_only
        # Read-only is enforced here rather than with orbax's flag, which logs warnings on every open.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            enable_async_checkpointing=async_save,
            # Leftovers of a save that was killed would block saving that step again after resume.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory.absolute(),
            item_names=(STATE_ITEM, META_ITEM),
            item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(), META_ITEM: MetadataHandler()},
            options=options,
        )
        # orbax removes a killed save's leftovers in a background future that its close() does not await; one
        # left running when the interpreter exits dies with a traceback. Finish it now (a directory listing).
        finish_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
        if finish_cleanup is not None:
            finish_cleanup()
        self._in_flight: int | None = None

    # -- listing --------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of complete checkpoints, ascending.

        A save still in flight in this process is not listed, nor are the old steps it will delete once done.
        """
        steps = sorted(self._mngr.all_steps())
        if self._in_flight is not None and self._mngr.is_saving_in_progress():
            steps = [s for s in steps if s != self._in_flight]
        return steps

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    # -- saving ---------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, metadata: Mapping[str, Any], *, force: bool = False) -> bool:
        """Start saving `state` (pytree of jax arrays) and `metadata` (JSON-able dict) as `step`.

        Saves only when `step` is a multiple of `save_every`, or with `force` (preemption, end of run);
        never twice for one step. Returns whether a save started. When it returns, the arrays have been
        copied off the devices, so the caller may donate or overwrite them; the files are written in
        the background (`wait()` blocks until they are complete).
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        if not (force or self.should_save(step)):
            return False
        self._mngr.wait_until_finished()
        if step in self._mngr.all_steps():
            return False
        try:
            meta = json.loads(json.dumps(dict(metadata)))  # a private, JSON-checked copy for the writer thread
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata must be JSON-serialisable ({e})") from None
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.PyTreeSave(_keys_to_data(state)), META_ITEM: MetadataSave(meta)}
        )
        saved = self._mngr.save(step, args=args, force=True)
        if saved:
            self._in_flight = step
        return bool(saved)

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete on disk."""
        self._mngr.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        """Finish pending saves and release orbax's threads (once; later calls do nothing)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self._mngr.wait_until_finished()
        self._mngr.close()
        self._in_flight = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- restoring ------------------------------------------------------------------------------------

    def _resolve_step(self, step: int | None) -> int:
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CmeError(f"no complete checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CmeError(
                f"step {step} has no complete checkpoint in {self.directory} (available: {', '.join(map(str, steps))})"
            )
        return step

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The metadata dict of `step` (default: the latest complete step)."""
        step = self._resolve_step(step)
        return self._mngr.restore(step, args=ocp.args.Composite(**{META_ITEM: MetadataRestore()}))[META_ITEM]

    def restore(self, abstract_state: Any, step: int | None = None, *, partial: bool = False) -> Restored:
        """Restore `step` (default: latest) into the structure, dtypes and shardings of `abstract_state`.

        `abstract_state` holds jax.ShapeDtypeStruct leaves (or arrays as templates); a leaf with a sharding
        is read straight into that sharding (each process reads only its shards), one without a sharding
        comes back as a numpy array. PRNG key leaves (key dtypes) come back as typed keys. With `partial`,
        `abstract_state` may name a subset of the saved tree, e.g. `{"params": abstract_params}`.
        """
        step = self._resolve_step(step)
        target = jax.tree.map(_abstract_key_data, abstract_state)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        args = ocp.args.Composite(
            **{
                STATE_ITEM: ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=partial),
                META_ITEM: MetadataRestore(),
            }
        )
        try:
            out = self._mngr.restore(step, args=args)
        except (ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CmeError(
                f"checkpoint step {step} in {self.directory} does not fit the state of this run ({first}); "
                "resume with the configuration it was saved with, or start a new run directory"
            ) from None
        state = out[STATE_ITEM]
        for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(target)):
            if tuple(got.shape) != tuple(want.shape):
                raise CmeError(
                    f"checkpoint step {step} in {self.directory} holds {jax.tree_util.keystr(path)} with shape "
                    f"{tuple(got.shape)} where this run expects {tuple(want.shape)}; resume with the configuration "
                    "it was saved with, or start a new run directory"
                )
        return Restored(step, _rewrap_keys(abstract_state, state), out[META_ITEM])


# ----------------------------------------------------------------------------------------------------------
# Preemption: TPU VMs (and most schedulers) send SIGTERM some time before killing the process.


class PreemptionFlag:
    """Set by a signal handler; the training loop polls `requested`, saves a checkpoint and exits."""

    def __init__(self, signals: Iterable[int]):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if not self.requested:
            # os.write, not print: the handler may interrupt a print to the same stream.
            name = signal.Signals(signum).name
            os.write(2, f"received {name}: saving a checkpoint and stopping after this step\n".encode())
        self.requested = True
        self.signum = signum

    def any_process(self) -> bool:
        """Whether any process was signalled; a collective, so every process must call it at the same step."""
        from cme_jax.distributed import any_process

        return any_process(self.requested)

    def uninstall(self) -> None:
        """Put back the handlers that were installed before."""
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()


def install_preemption_handler(signals: Iterable[int] = (signal.SIGTERM,)) -> PreemptionFlag:
    """Catch SIGTERM (by default) so the run can checkpoint and exit 0 instead of dying; main thread only."""
    return PreemptionFlag(signals)


def parse_run_spec(spec: str) -> tuple[Path, int | None] | None:
    """(run directory, step or None for the latest) when `spec` names a training run, else None."""
    path = Path(spec).expanduser()
    if path.is_dir() and checkpoint_dir(path).is_dir():
        return path, None
    head, sep, tail = spec.rpartition("@")
    if sep and head:
        run = Path(head).expanduser()
        if run.is_dir() and checkpoint_dir(run).is_dir():
            if not tail.isdigit():
                raise CmeError(f"{spec!r}: the step after '@' must be a number, e.g. {head}@100")
            return run, int(tail)
    if path.is_dir() and (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        raise CmeError(f"run directory {path} has no {checkpoint_dir(path).name}/ yet; train until the first save")
    return None


@dataclasses.dataclass(frozen=True)
class RunCheckpoint:
    """A training run's checkpoint: where, which step, the base model spec and the recorded config."""

    run_dir: Path
    step: int
    model_spec: str
    config: dict[str, Any]

    @property
    def source(self) -> str:
        """Identifies the weights: the run directory's absolute path and the step."""
        return f"{self.run_dir.resolve()}@{self.step}"


def inspect_run(run_dir: str | Path, step: int | None = None) -> RunCheckpoint:
    """Read a run's checkpoint metadata (no weights): the step (default latest), model spec and config."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CmeError(f"run directory {run_dir} does not exist; pass the directory the trainer wrote")
    if not checkpoint_dir(run_dir).is_dir():
        raise CmeError(f"{run_dir} has no {checkpoint_dir(run_dir).name}/ directory; is it a training run directory?")
    with CheckpointManager(run_dir, read_only=True) as mngr:
        if mngr.latest_step() is None:
            raise CmeError(f"{checkpoint_dir(run_dir)} holds no complete checkpoint yet; train until the first save")
        meta = mngr.metadata(step)
        step = step if step is not None else mngr.latest_step()
    spec = meta.get("model_spec")
    if not isinstance(spec, str) or not spec:
        raise CmeError(
            f"checkpoint metadata in {checkpoint_dir(run_dir)} has no model_spec, so the policy cannot be rebuilt; "
            "use run directories written by cme_jax.train"
        )
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    return RunCheckpoint(run_dir, int(step), spec, config)


def restore_run_policy(run: RunCheckpoint) -> tuple[ModelConfig, Weights, Any, Any]:
    """A run's policy as float32 host arrays (a LoRA run's adapters merged into its base), with its architecture,
    model source and tokenizer (from the spec recorded in the checkpoint): what `export` writes, `evaluate` loads."""
    from cme_jax.models import lora as lora_lib
    from cme_jax.models.families import config_from_hf
    from cme_jax.models.weights import load_weights
    from cme_jax.sources import open_store

    src = resolve(run.model_spec)
    cfg = config_from_hf(src.hf_config)
    tokenizer = load_tokenizer(src)
    lora = lora_lib.lora_from_config(run.config)
    if lora is None:
        # bf16 -> f32 is exact, so reading every weight as float32 loses nothing whatever the run trained in.
        shapes = abstract(cfg, jnp.float32)
        host = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes, is_leaf=is_spec)
    else:  # a LoRA run saves only its adapters: merge them into the base the spec names
        host = lora_lib.host_adapters_abstract(cfg, lora)
    with CheckpointManager(run.run_dir, read_only=True) as mngr:
        params = mngr.restore({"params": host}, run.step, partial=True).state["params"]
    if lora is not None:
        base = load_weights(cfg, open_store(src), dtype=jnp.float32)
        params = jax.tree.map(np.asarray, jax.jit(lora_lib.merge, static_argnums=2)(base, params, lora))
    return cfg, params, src, tokenizer


def load_run_model(run: RunCheckpoint, *, dtype: VerifierDtype = "auto") -> LoadedModel:
    """The run's policy as a loaded model in `dtype`: `restore_run_policy` cast once."""
    cfg, params, src, tokenizer = restore_run_policy(run)
    target = resolve_dtype(dtype)
    weights = jax.tree.map(lambda x: jnp.asarray(x, target), params)
    return LoadedModel(run.source, cfg, weights, tokenizer, src.hf_config, src)


def model_source(spec: str, dtype: VerifierDtype) -> tuple[str, Callable[[], LoadedModel], RunCheckpoint | None]:
    """(source id, loader, run or None) for a model spec or a run directory; checks it before any weights load."""
    run_spec = parse_run_spec(spec)
    if run_spec is not None:
        run = inspect_run(*run_spec)
        resolve(run.model_spec)  # fail now on a base model that is gone
        return run.source, lambda: load_run_model(run, dtype=dtype), run
    resolve(spec)
    return spec, lambda: load_model(spec, dtype=resolve_dtype(dtype)), None
