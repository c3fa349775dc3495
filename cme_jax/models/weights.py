"""Checkpoint tensors -> Weights pytree (optionally straight into a mesh sharding) and back to HF files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from cme_jax.errors import CmeError
from cme_jax.models.families import HFParam, detect_prefix, hf_param_map
from cme_jax.models.sharding import ParamSpec, is_spec
from cme_jax.models.transformer import ModelConfig, Weights, abstract


class TensorStore(Protocol):
    """Read-only name -> numpy array access (HF names, HF layouts)."""

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


class DictStore:
    """A TensorStore over in-memory numpy arrays."""

    def __init__(self, tensors: Mapping[str, np.ndarray]):
        self._t = dict(tensors)

    def names(self) -> set[str]:
        return set(self._t)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._t[name].shape)

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self._t[name])


class SafetensorsStore:
    """A TensorStore over one or more .safetensors files, read lazily through memory maps."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles: dict[str, Any] = {}
        self._where: dict[str, Any] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="numpy")
            except FileNotFoundError:
                raise CmeError(f"weight file {f} is missing; download the checkpoint again") from None
            except Exception as e:
                raise CmeError(f"cannot read weight file {f} ({e}); it may be truncated, download it again") from None
            self._handles[str(f)] = h
            for k in h.keys():  # noqa: SIM118  (safe_open has keys() but no __iter__)
                self._where[k] = h

    @classmethod
    def from_dir(cls, path: Path) -> SafetensorsStore:
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                mapping = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CmeError(f"{index} is not a valid safetensors index ({e})") from None
            files = sorted({path / f for f in mapping.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CmeError(f"{index} lists {missing[0]} which is missing; download the checkpoint again")
            return cls(files)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CmeError(f"no *.safetensors weights in {path}; convert the checkpoint to safetensors first")
        return cls(files)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        try:
            return self._where[name].get_tensor(name)
        except Exception as e:
            raise CmeError(f"cannot read tensor {name} ({e}); the weight file may be truncated") from None


def numpy_dtype(dtype: Any) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype))


def _leaf_reader(param: HFParam, spec: ParamSpec, store: TensorStore, dtype: np.dtype):
    """Returns read(layer_slice) -> np.ndarray of the stacked (or single) leaf, shape-checked."""
    missing = [n for n in param.names if n not in store.names()]
    if missing:
        raise CmeError(f"tensor {missing[0]} is missing from the checkpoint; the weights do not match the config")
    want = spec.shape[1:] if param.stacked else spec.shape

    def one(name: str) -> np.ndarray:
        arr = param.to_ours(store.get(name))
        if tuple(arr.shape) != tuple(want):
            raise CmeError(
                f"tensor {name} has shape {tuple(store.shape(name))}, which does not fit the config "
                f"(expected {tuple(want)} after conversion); check config.json against the weights"
            )
        return arr.astype(dtype, copy=False)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if not param.stacked:
            return one(param.names[0])[index]
        layers = range(*index[0].indices(len(param.names)))
        return np.stack([one(param.names[i])[index[1:]] for i in layers])

    return read


def load_weights(
    cfg: ModelConfig,
    store: TensorStore,
    *,
    dtype: Any = jnp.float32,
    shardings: Any = None,
    prefix: str | None = None,
) -> Weights:
    """Build the Weights pytree from HF-named tensors.

    With `shardings` (a Weights pytree of NamedSharding) every device reads only its own slice, so no
    full copy is ever placed on one device; each process touches only its addressable shards.
    """
    prefix = detect_prefix(store.names()) if prefix is None else prefix
    hf_map = hf_param_map(cfg, prefix)
    specs = abstract(cfg, dtype)
    npdtype = numpy_dtype(dtype)
    spec_leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    map_leaves = treedef.flatten_up_to(hf_map)
    shard_leaves = [None] * len(spec_leaves) if shardings is None else treedef.flatten_up_to(shardings)
    out = []
    for spec, param, sharding in zip(spec_leaves, map_leaves, shard_leaves):
        read = _leaf_reader(param, spec, store, npdtype)
        full = tuple(slice(None) for _ in spec.shape)
        if sharding is None:
            out.append(jnp.asarray(read(full)))
        else:
            cache: dict[Any, np.ndarray] = {}

            def cb(index, read=read, cache=cache):
                key = tuple((s.start, s.stop, s.step) for s in index)
                if key not in cache:
                    cache[key] = read(tuple(index))
                return cache[key]

            out.append(jax.make_array_from_callback(spec.shape, sharding, cb))
    return jax.tree.unflatten(treedef, out)


def iter_hf_tensors(weights: Weights, cfg: ModelConfig, prefix: str = "model.") -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array in HF layout) for every tensor of the model."""
    hf_map = hf_param_map(cfg, prefix)
    leaves, treedef = jax.tree.flatten(weights)
    for arr, param in zip(leaves, treedef.flatten_up_to(hf_map)):
        host = np.asarray(jax.device_get(arr))
        if param.stacked:
            for i, name in enumerate(param.names):
                yield name, np.ascontiguousarray(param.to_hf(host[i]))
        else:
            yield param.names[0], np.ascontiguousarray(param.to_hf(host))


def save_hf_checkpoint(
    out_dir: str | os.PathLike,
    weights: Weights,
    cfg: ModelConfig,
    hf_config: Mapping[str, Any],
    tokenizer: Any = None,
    *,
    dtype: Any = jnp.float32,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write a HF directory (safetensors shards + index, config.json, tokenizer) transformers can load."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npdtype = numpy_dtype(dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in iter_hf_tensors(weights, cfg):
        arr = arr.astype(npdtype)
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(a.nbytes for s in shards for a in s.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(hf_config)
    config["dtype"] = "bfloat16" if npdtype == np.dtype(ml_dtypes.bfloat16) else "float32"
    config.pop("torch_dtype", None)
    config.pop("quantization_config", None)
    config["tie_word_embeddings"] = cfg.tie_embeddings
    if not config.get("architectures"):  # configs built from GGUF metadata have none; tools that reload need it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type", ""))
        if arch:
            config["architectures"] = [arch]
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
