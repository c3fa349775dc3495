"""Low-rank adapters: their configuration and their shapes beside a frozen base (a pytree of A and B factors)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

from cme_jax.models.transformer import ModelConfig, ParamSpec, abstract

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
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            raise ValueError(f"model.lora.dropout={self.dropout!r} must be in [0, 1)")
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
    """ParamSpecs of the adapters: for a target weight [L, *in, *out], A is [L, *in, r] and B is [L, r, *out]."""
    layers = abstract(cfg).layers
    out: dict[str, dict[str, ParamSpec]] = {}
    for target in lora.targets:
        field, n_in = TARGET_WEIGHTS[target]
        w: ParamSpec = getattr(layers, field)
        split = 1 + n_in
        out[target] = {
            "a": ParamSpec((*w.shape[:split], lora.rank), (*w.axes[:split], "lora_rank")),
            "b": ParamSpec((w.shape[0], lora.rank, *w.shape[split:]), (w.axes[0], "lora_rank", *w.axes[split:])),
        }
    return out
