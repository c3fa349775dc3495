"""The trainer's configuration schema: frozen dataclasses are the one source of truth for options and defaults.

YAML files in configs/ override the defaults and `key.sub=value` arguments override the YAML; `load_config`
validates everything (unknown keys, types, ranges, impossible combinations) before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cme_jax import configtools
from cme_jax.errors import CmeError
from cme_jax.grpo import GRPOConfig
from cme_jax.metrics import LoggingConfig
from cme_jax.models.lora import LoraConfig
from cme_jax.models.sharding import mesh_sizes
from cme_jax.models.transformer import Remat
from cme_jax.prompts import DataConfig
from cme_jax.rewards import RewardConfig
from cme_jax.sampling import SamplingConfig
from cme_jax.scoring import VerifierConfig
from cme_jax.tokens import DEFAULT_PLAIN_TEMPLATE, PromptFormat
from cme_jax.train_step import OptimConfig, StepConfig
from cme_jax.watchdog import WatchConfig

DtypeName = Literal["auto", "float32", "bfloat16"]
ResumeMode = Literal["auto", "never", "require"]
PromptPadding = Literal["bucket", "max"]


@dataclasses.dataclass(frozen=True)
class ModelConfigSection:
    """The policy, its frozen reference, and how prompts are shown to it."""

    policy: str = "smollm2-135m-instruct"
    reference: str | None = "policy"  # "policy" = a frozen copy of the initial policy; null = none
    prompt_format: PromptFormat = "auto"  # auto = chat template if the tokenizer has one, else `template`
    template: str = DEFAULT_PLAIN_TEMPLATE  # plain format for pretrained policies, with {prompt}
    system_prompt: str | None = None
    stop_strings: tuple[str, ...] = ()  # extra single-token stops (pretrained models often need "\n\n"-like ones)
    compute_dtype: DtypeName = "auto"  # auto = bfloat16 on accelerators, float32 on the CPU
    remat: Remat = "none"
    # Low-rank adapters on a frozen base (null = full fine-tuning); the reference is then the base itself.
    lora: LoraConfig | None = None

    def __post_init__(self):
        if not self.policy:
            raise ValueError("model.policy must name a model (Hub id, directory, .gguf file or embedded alias)")
        if "{prompt}" not in self.template:
            raise ValueError(f"model.template={self.template!r} must contain {{prompt}}")
        if self.lora is not None and self.reference not in (None, "policy"):
            raise ValueError(
                f"model.reference={self.reference!r}: with model.lora the reference is the frozen base itself; set "
                "model.reference to 'policy' (or null for none)"
            )


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """Step counts and the shape of each RL step."""

    steps: int = 100
    prompts_per_step: int = 4  # B prompts; the rollout has B * sampling.num_samples rows
    num_iterations: int = 1  # mu: passes over each rollout batch
    minibatches: int = 1  # optimizer updates per pass
    micro_batches: int = 1  # gradient accumulation inside one update
    seed: int = 0
    max_nonfinite_steps: int = 3  # stop the run after this many steps in a row whose updates were all skipped
    log_entropy: bool = True
    fused: bool = True  # one jit for sample + score + update when every reward can run on device
    # bucket: each batch padded to a length bucket (a few compilations, least padding); max: every batch
    # padded to the longest training prompt's bucket (one compilation: best for short runs and CPUs).
    prompt_padding: PromptPadding = "bucket"
    # End the run cleanly (with a final checkpoint) when a watchdog signal fires; the checkpoint saved before
    # the warning is kept as the last good policy.
    stop_on_hacking: bool = False
    # Every N steps (and before the first and after the last), greedy responses to the first heldout_prompts
    # held-out prompts are scored with the training reward and their KL to the reference: RUN_DIR/heldout.jsonl.
    heldout_every: int = 0
    heldout_prompts: int = 8
    # The memory check at start (the planner's, `python -m cme_jax.plan`): "auto" compares against the memory JAX
    # reports for the device (accelerators; the CPU is not checked), a size like "60GB" against that size per
    # device, "off" skips it. A run whose planned peak exceeds it is refused before any weight loads.
    device_memory: str = "auto"

    def __post_init__(self):
        if self.device_memory not in ("auto", "off"):
            configtools.parse_size(self.device_memory, "train.device_memory")
        for name in ("steps", "prompts_per_step", "num_iterations", "minibatches", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.heldout_every < 0 or self.heldout_prompts < 1:
            raise ValueError(
                f"train.heldout_every={self.heldout_every} must be >= 0 (0 = off) and train.heldout_prompts="
                f"{self.heldout_prompts} >= 1"
            )
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"train.max_nonfinite_steps={self.max_nonfinite_steps} must be >= 1")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh sizes; one may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"mesh sizes {sizes} must be >= 1, with at most one -1")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 50  # steps between saves (a final save always happens)
    keep: int = 3
    async_save: bool = True
    resume: ResumeMode = "auto"  # auto: continue when run_dir has a checkpoint; require: fail if it has none

    def __post_init__(self):
        if self.every < 1 or self.keep < 1:
            raise ValueError("checkpoint.every and checkpoint.keep must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs."""

    run_dir: str = "runs/default"
    model: ModelConfigSection = dataclasses.field(default_factory=ModelConfigSection)
    # Default: the offline pair (an embedded verifier from another family, read through a plain template).
    reward: RewardConfig = dataclasses.field(
        default_factory=lambda: RewardConfig(
            verifiers=(VerifierConfig("gemma3-270m", context="plain", template="Question: {prompt}\nAnswer:"),)
        )
    )
    sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(num_samples=4))
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    watch: WatchConfig = dataclasses.field(default_factory=WatchConfig)
    audit_at_start: bool = False  # audit the verifiers on the shipped preference pairs before training
    audit_pairs: int = 12  # pairs the start-up audit scores (each adds one scoring pass per rewrite kind)

    def __post_init__(self):
        g, s, t = self.grpo, self.sampling, self.train
        if s.num_samples < 2 and g.advantage_mode != "batch_std":
            raise ValueError(
                f"sampling.num_samples={s.num_samples}: group-relative advantages need at least 2 samples per prompt"
            )
        if s.temperature == 0 and s.num_samples > 1:
            raise ValueError("sampling.temperature=0 (greedy) makes every sample of a prompt identical; use > 0")
        rows = t.prompts_per_step * s.num_samples
        per = t.minibatches * t.micro_batches
        if rows % per:
            raise ValueError(
                f"train.prompts_per_step x sampling.num_samples = {rows} rows do not split into "
                f"train.minibatches x train.micro_batches = {per}; choose sizes that divide"
            )
        if g.beta > 0 and self.model.reference is None:
            raise ValueError("grpo.beta > 0 needs model.reference (use 'policy' for the initial policy weights)")
        if g.loss_aggregation == "seq_mean_token_sum_norm" and g.max_response_length < s.max_new_tokens:
            raise ValueError(
                f"grpo.max_response_length={g.max_response_length} is below sampling.max_new_tokens="
                f"{s.max_new_tokens}; Dr. GRPO's normaliser must be at least the longest response"
            )
        uses_cme = any(term.name == "cme" for term in self.reward.terms)
        if uses_cme and not self.reward.verifiers:
            raise ValueError("reward.terms uses 'cme' but reward.verifiers is empty; add at least one verifier")
        if t.heldout_every and self.data.heldout_fraction == 0:
            raise ValueError("train.heldout_every needs held-out prompts: set data.heldout_fraction > 0 (e.g. 0.05)")
        if t.stop_on_hacking and not self.watch.enabled:
            raise ValueError("train.stop_on_hacking needs the watchdog: set watch.enabled=true")
        if t.stop_on_hacking and self.checkpoint.keep < 2:
            raise ValueError(
                f"train.stop_on_hacking needs checkpoint.keep >= 2 (got {self.checkpoint.keep}) so the checkpoint "
                "saved before the warning survives the final save"
            )
        if self.audit_pairs < 1:
            raise ValueError(f"audit_pairs={self.audit_pairs} must be >= 1")
        if self.data.max_prompt_tokens + s.max_new_tokens > 1 << 20:
            raise ValueError("data.max_prompt_tokens + sampling.max_new_tokens is implausibly large")


def check_mesh_fits(cfg: TrainConfig, device_count: int) -> tuple[int, int, int]:
    """Resolve the mesh sizes for this many devices and check the batch splits over the data axes."""
    sizes = mesh_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, device_count)
    data_ways = sizes[0] * sizes[1]
    if cfg.train.prompts_per_step % data_ways:
        raise CmeError(
            f"train.prompts_per_step={cfg.train.prompts_per_step} does not divide over the {data_ways} data-parallel "
            f"devices (mesh.data x mesh.fsdp); use a multiple of {data_ways}"
        )
    return sizes[0], sizes[1], sizes[2]


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults <- YAML <- `key.sub=value` overrides, validated (CmeError on the first problem)."""
    return configtools.load(TrainConfig, path, overrides)


def config_to_dict(cfg: TrainConfig) -> dict:
    return configtools.to_dict(cfg)


def config_yaml(cfg: TrainConfig) -> str:
    return configtools.dump_yaml(cfg)


def step_config(cfg: TrainConfig, compute_dtype: str) -> StepConfig:
    """The static shape of one RL step of this run (what the trainer jits and the planner measures)."""
    return StepConfig(
        grpo=cfg.grpo,
        sampling=cfg.sampling,
        num_iterations=cfg.train.num_iterations,
        minibatches=cfg.train.minibatches,
        micro_batches=cfg.train.micro_batches,
        compute_dtype=compute_dtype,
        log_entropy=cfg.train.log_entropy,
        lora=cfg.model.lora,
    )
