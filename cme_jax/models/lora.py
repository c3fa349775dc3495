"""Low-rank adapters beside a frozen base: their configuration, shapes, initialisation, the base with the adapters
applied on the fly (`adapted`) or merged (`merge`), and PEFT's file format.

The adapters are a plain pytree, {target: {"a": A, "b": B}}, with the layer axis leading as in the base's stacked
weights: the update of a weight W [L, *in, *out] is scale * A B with A [L, *in, r] and B [L, r, *out].
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from cme_jax.models.families import hf_param_map
from cme_jax.models.sharding import is_spec, param_shardings
from cme_jax.models.transformer import LowRank, ModelConfig, ParamSpec, Weights, abstract, merge_low_rank
from cme_jax.models.weights import numpy_dtype

Adapters = dict[str, dict[str, Any]]

LoraTarget = Literal["q", "k", "v", "o", "gate", "up", "down"]
ALL_TARGETS: tuple[LoraTarget, ...] = get_args(LoraTarget)

# Target -> (LayerWeights field, how many axes after the layer axis are inputs). Every other axis is an output.
TARGET_WEIGHTS: dict[str, tuple[str, int]] = {
    "q": ("wq", 1),
    "k": ("wk", 1),
    "v": ("wv", 1),
    "o": ("wo", 2),
    "gate": ("w_gate", 1),
    "up": ("w_up", 1),
    "down": ("w_down", 1),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapters W + (alpha / rank) * A @ B on the chosen projections of every layer; the base stays frozen."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[LoraTarget, ...] = ALL_TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"model.lora.rank={self.rank!r} must be an integer >= 1")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"model.lora.alpha={self.alpha!r} must be a finite number > 0")
        if self.dropout != 0:  # accepted as a key so PEFT-style configs read, but never silently ignored
            raise ValueError(
                f"model.lora.dropout={self.dropout!r}: dropout on the adapters is not implemented; set it to 0"
            )
        if not self.targets:
            raise ValueError(f"model.lora.targets is empty; choose some of {', '.join(ALL_TARGETS)}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown:
            raise ValueError(
                f"model.lora.targets: {unknown[0]!r} is not a projection; choose from {', '.join(ALL_TARGETS)}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"model.lora.targets={list(self.targets)} names a projection twice")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def abstract_adapters(cfg: ModelConfig, lora: LoraConfig) -> dict[str, dict[str, ParamSpec]]:
    """ParamSpecs of the adapters: for a target weight [L, *in, *out], A is [L, *in, r] and B is [L, r, *out].

    The adapters are replicated on every device (rank r keeps them small; with rank 64 on every projection of an 8B
    model, adapters, gradients and Adam moments hold about 2.4 GB). Split over the tensor axis like their weights,
    the fused step's collectives deadlocked in XLA's CPU runtime (8 devices, data=2 x tensor=4), which runs
    independent collectives concurrently.
    """
    layers = abstract(cfg).layers
    out: dict[str, dict[str, ParamSpec]] = {}
    for target in lora.targets:
        field, n_in = TARGET_WEIGHTS[target]
        w: ParamSpec = getattr(layers, field)
        split = 1 + n_in
        whole_in, whole_out = (None,) * n_in, (None,) * (len(w.shape) - split)
        out[target] = {
            "a": ParamSpec((*w.shape[:split], lora.rank), (w.axes[0], *whole_in, "lora_rank")),
            "b": ParamSpec((w.shape[0], lora.rank, *w.shape[split:]), (w.axes[0], "lora_rank", *whole_out)),
        }
    return out


def init_adapters(cfg: ModelConfig, lora: LoraConfig, key: jax.Array) -> Adapters:
    """Float32 adapters with B = 0 (the adapted model starts as the base) and A uniform in +-1/sqrt(fan_in)."""
    specs = abstract_adapters(cfg, lora)
    keys = jax.random.split(key, len(specs))
    out: Adapters = {}
    for k, (target, ab) in zip(keys, specs.items()):
        a, b = ab["a"], ab["b"]
        bound = 1.0 / math.sqrt(math.prod(a.shape[1:-1]))
        out[target] = {
            "a": jax.random.uniform(k, a.shape, jnp.float32, -bound, bound),
            "b": jnp.zeros(b.shape, jnp.float32),
        }
    return out


def adapter_shardings(cfg: ModelConfig, lora: LoraConfig, mesh: Any) -> Any:
    """NamedShardings of the adapters by the rules (replicated: see `abstract_adapters`)."""
    return param_shardings(abstract_adapters(cfg, lora), mesh)


def host_adapters_abstract(cfg: ModelConfig, lora: LoraConfig) -> Any:
    """float32 ShapeDtypeStructs without shardings: restore reads them as host numpy arrays."""
    specs = abstract_adapters(cfg, lora)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), specs, is_leaf=is_spec)


def adapted(base: Weights, adapters: Adapters, lora: LoraConfig) -> Weights:
    """The base with each target matrix a `LowRank` (base + adapters applied on the fly); no weight is copied.

    Every model function takes the result as it takes plain weights; gradients through it reach the adapters and,
    when `base` is a constant of the differentiated function, nothing else.
    """
    fields = {}
    for target, ab in adapters.items():
        field = TARGET_WEIGHTS[target][0]
        fields[field] = LowRank(getattr(base.layers, field), ab["a"], ab["b"], lora.scale)
    return base.replace(layers=base.layers.replace(**fields))


def merge(base: Weights, adapters: Adapters, lora: LoraConfig) -> Weights:
    """Plain weights W + scale A B on every target (a new copy of those matrices, in the base's dtype)."""
    return merge_low_rank(adapted(base, adapters, lora))


def lora_from_config(config: Mapping[str, Any] | None) -> LoraConfig | None:
    """The LoraConfig of a run's recorded config (a checkpoint's metadata["config"]), None for a full fine-tune."""
    section = ((config or {}).get("model") or {}).get("lora")
    if section is None:
        return None
    return LoraConfig(**{**section, "targets": tuple(section.get("targets", ALL_TARGETS))})


# ----------------------------------------------------------------------------------------------------------
# PEFT's format: adapter_config.json and adapter_model.safetensors with one lora_A [r, in] and lora_B [out, r]
# per layer and projection, named after the Hugging Face module they adapt.

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def hf_modules(cfg: ModelConfig, target: str, prefix: str = "model.") -> tuple[str, ...]:
    """The Hugging Face module of `target` in each layer, e.g. model.layers.0.self_attn.q_proj (the family's names)."""
    weight_names = getattr(hf_param_map(cfg, prefix).layers, TARGET_WEIGHTS[target][0]).names
    return tuple(name.removesuffix(".weight") for name in weight_names)


def peft_tensors(adapters: Adapters, cfg: ModelConfig, prefix: str = "model.") -> dict[str, np.ndarray]:
    """PEFT's state dict of `adapters`: HF layouts are [out, in] with the head axes flattened into one."""
    out: dict[str, np.ndarray] = {}
    for target, ab in adapters.items():
        a, b = np.asarray(jax.device_get(ab["a"])), np.asarray(jax.device_get(ab["b"]))
        rank = a.shape[-1]
        for i, name in enumerate(hf_modules(cfg, target, prefix)):
            module = "base_model.model." + name
            out[f"{module}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            out[f"{module}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    return out


def peft_config(cfg: ModelConfig, lora: LoraConfig, base: str, prefix: str = "model.") -> dict[str, Any]:
    """adapter_config.json for `lora` on the base model `base` (a Hub id or a directory)."""
    modules = [hf_modules(cfg, t, prefix)[0].rsplit(".", 1)[1] for t in lora.targets]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }


def save_peft(
    out_dir: str | Path,
    adapters: Adapters,
    cfg: ModelConfig,
    lora: LoraConfig,
    base: str,
    *,
    prefix: str = "model.",
    dtype: Any = jnp.float32,
) -> Path:
    """Write `adapters` as a PEFT LoRA adapter directory that `peft.PeftModel.from_pretrained(base_model, out_dir)`
    loads onto the base."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.astype(numpy_dtype(dtype)) for k, v in peft_tensors(adapters, cfg, prefix).items()}
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(peft_config(cfg, lora, base, prefix), indent=2))
    return out
