"""Per-device memory of a training run, planned before any weight loads (`python -m cme_jax.plan`, the trainer's check).

Persistent state is exact: every array of the master weights, the optimizer state, the reference, the verifiers
and LoRA adapters is described by its abstract shape and dtype and placed with the trainer's own shardings
(`weight_shardings`, `state_shardings`) on an abstract mesh of the planned size; a line is the sum of the shard
sizes on one device. A step's temporaries come in three phases that never hold them at the same time (sampling,
verifier scoring, the update), each estimated by the formulas below; the peak is the persistent state plus the
largest phase.

Formulas (bytes per device; b = bytes of the compute dtype; D model width, L layers, N and K query and key/value
heads of size H, F MLP width, V vocabulary; t the tensor-parallel size divides N, K, F and V where it divides them
(fewer K/V heads than t stay whole); P the prompt bucket of data.max_prompt_tokens, n = sampling.max_new_tokens,
T = P + n). The model places activations by the rules table: rows over data x fsdp, the model width whole.

    sampling   KV cache     2 L R_s K H b S + 2 L B_s K H b P   (S = P + n; the prompts' cache before it is copied
                            per sample)
               weights      the compute-dtype copy (when the master weights are float32 and compute is not) plus the
                            decode copy of the layers in the layout the sampler picks (per-layer on GPUs, fused on
                            CPUs, none on TPUs, which decode stacked layers); with LoRA, one copy of the layers with
                            the adapters merged
               gathered     under fsdp, decode steps read whole weights: the LM head and (per-layer layouts) every
                            layer gathered once per call, plus one layer for the prefill
               decode tmp   12 V R_s (float32 logits, exponentials, filter of one step) + prefill of B_s prompts
    scoring    per verifier, a forward over one block of ~4096 tokens (scoring.DEFAULT_BLOCK_TOKENS):  fwd(rows, T_v);
               a served verifier runs on its server and takes nothing here
    update     gradients    float32 trainable weights, twice with micro-batches (accumulator + current); the
                            compute-dtype copy of the weights the loss reads; under fsdp one layer and the LM head
                            gathered in the compute dtype with their float32 gradients before the reduce-scatter
               activations  max(backward of one micro-batch, fwd over all rows for the reference log-probs
                            (grpo.beta > 0) or the old ones (grpo.old_logp=recompute with more than one optimizer
                            update), the optimizer's float32 update tree, which lives after the backward)
      backward  = r T L s_saved + max(r T s_recompute + 12 r N T^2, 12 min(r n V, 2^24)) + r T D (b + 4)
      s_layer   = b (5 D + 4 N H + 3 K H + 7 F) + 8 D    saved per token and layer without remat (fitted to XLA's
                                                        memory analysis of the update on the CPU, float32)
      s_saved   = s_layer (remat none) | b D (full: the layer input) | b (3 D + N H + 2 K H + 2 F) (dots)
      s_recompute = 0 (none) | s_layer (full, dots: one layer is rematerialised at a time)
      fwd(rows, T) = 2 rows T D b + max(rows T b (N H + 2 K H + 3 F), 8 rows N T^2, 8 min(rows n V, 2^24))
    with R_s and R_u = rows per device while sampling and in the update, r = rows per device of one micro-batch
    (all split over data x fsdp: UPDATE_ROW_AXES); every micro-batch runs the same forward and backward, one after
    another.

Against XLA's memory analysis of the compiled sampling and update programs on 8 CPU devices in float32 (two model
shapes, six meshes of data, fsdp and tensor, remat none/dots/full, 1, 2 and 4 micro-batches, 32 to 128 new
tokens), the plan is 0.95x-1.21x for sampling and 0.90x-1.39x for the update (0.98x-1.16x on meshes without
fsdp); the demo's planned peak is 4.42 GiB against 4.25 GiB measured (tests/test_memory.py). bfloat16 activations
on accelerators are counted at b = 2 bytes, which the CPU cannot check (it computes bfloat16 in float32).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from cme_jax import configtools
from cme_jax.config import TrainConfig, check_mesh_fits, step_config
from cme_jax.errors import CmeError
from cme_jax.models import decode_layout
from cme_jax.models.logprobs import DEFAULT_CHUNK_ELEMENTS
from cme_jax.models.lora import abstract_adapters
from cme_jax.models.sharding import MESH_AXES, is_spec, param_shardings, weight_shardings
from cme_jax.models.transformer import ModelConfig, abstract
from cme_jax.scoring import DEFAULT_BLOCK_TOKENS
from cme_jax.tokens import bucket_length
from cme_jax.train_step import init_state, make_optimizer, state_shardings

Platform = Literal["cpu", "gpu", "tpu"]
Phase = Literal["persistent", "sampling", "scoring", "update"]
PHASES: tuple[Phase, ...] = ("sampling", "scoring", "update")
Verdict = Literal["fits", "tight", "does not fit", "unknown"]

# "fits" leaves this share of the budget for XLA's workspaces, fragmentation and the runtime's own buffers.
HEADROOM = 0.10
# JAX preallocates this share of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.
JAX_GPU_FRACTION = 0.75
# Mesh axes that split the update's rows: the model places its activations by the rules, which give the batch axis
# data and fsdp (the model width then stays whole: fsdp went to the rows), so fsdp splits rows as data does (XLA on
# 8 CPU devices, same model and batch, remat none: 72.9 MiB of update temporaries on fsdp=8, 86.9 MiB on data=8,
# the difference being the float32 gradients fsdp shards).
UPDATE_ROW_AXES = ("data", "fsdp")
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Line:
    """One entry of the plan: bytes per device in one phase of a step."""

    phase: Phase
    name: str
    bytes: int
    detail: str


@dataclasses.dataclass(frozen=True)
class Budget:
    """The memory a device may use, and where that figure came from."""

    bytes: int
    source: str


@dataclasses.dataclass(frozen=True)
class Models:
    """Architectures of the policy and of each verifier (in reward.verifiers order; None for a served one)."""

    policy: ModelConfig
    verifiers: tuple[ModelConfig | None, ...] = ()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory of one run on one mesh, by phase; `peak` = persistent + the largest phase."""

    lines: tuple[Line, ...]
    devices: int
    mesh: tuple[int, int, int]
    platform: Platform
    compute_dtype: str
    budget: Budget | None
    shapes: str  # rows and lengths, one line
    formulas: tuple[str, ...]  # the activation and cache formulas with this run's numbers

    def total(self, phase: Phase) -> int:
        return sum(line.bytes for line in self.lines if line.phase == phase)

    def get(self, name: str) -> int:
        return sum(line.bytes for line in self.lines if line.name == name)

    @property
    def persistent(self) -> int:
        return self.total("persistent")

    @property
    def peak_phase(self) -> Phase:
        return max(PHASES, key=self.total)

    @property
    def peak(self) -> int:
        return self.persistent + self.total(self.peak_phase)

    @property
    def verdict(self) -> Verdict:
        if self.budget is None:
            return "unknown"
        if self.peak > self.budget.bytes:
            return "does not fit"
        return "fits" if self.peak <= (1 - HEADROOM) * self.budget.bytes else "tight"


# ----------------------------------------------------------------------------------------------------------
# Inputs: architectures, platform, budget


def read_models(cfg: TrainConfig, config_dir: str | Path | None = None) -> Models:
    """Architectures of the run's models from their configs alone (no weights are read or downloaded); a served
    verifier's is not read (its server holds the model)."""
    from cme_jax.sources import architecture

    seen: dict[str, ModelConfig] = {}

    def arch(spec: str) -> ModelConfig:
        if spec not in seen:
            seen[spec] = architecture(spec, config_dir)
        return seen[spec]

    return Models(arch(cfg.model.policy), tuple(None if v.served else arch(v.model) for v in cfg.reward.verifiers))


def local_platform() -> Platform:
    backend = jax.default_backend()
    return "cpu" if backend == "cpu" else "tpu" if backend == "tpu" else "gpu"


def default_fraction(platform: Platform) -> float:
    """The share of a device's memory JAX may use: XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs (default 0.75), else all."""
    if platform != "gpu":
        return 1.0
    raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    try:
        return float(raw) if raw else JAX_GPU_FRACTION
    except ValueError:
        raise CmeError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} is not a number") from None


def budget_from_size(size: str, platform: Platform, fraction: float | None = None) -> Budget:
    """The budget for a device of `size` (e.g. 80GB) of which JAX may use `fraction` (default: see default_fraction)."""
    total = configtools.parse_size(size, "--device-memory")
    frac = default_fraction(platform) if fraction is None else fraction
    if not 0 < frac <= 1:
        raise CmeError(f"memory fraction {frac} must be in (0, 1]")
    if frac == 1:
        return Budget(total, size)
    if fraction is not None:
        why = "--memory-fraction"
    elif os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"):
        why = "XLA_PYTHON_CLIENT_MEM_FRACTION"
    else:
        why = "JAX's default share of a GPU"
    return Budget(int(total * frac), f"{size} x {frac:g}, {why}")


def device_budget() -> Budget | None:
    """The memory JAX may use on the smallest local device, where the backend reports it (not on the CPU)."""
    limits = []
    for d in jax.local_devices():
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    if not limits:
        return None
    source = f"{jax.local_devices()[0].device_kind}: what JAX may allocate"
    if local_platform() == "gpu" and not os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"):
        source += f", {JAX_GPU_FRACTION:g} of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise"
    return Budget(min(limits), source)


# ----------------------------------------------------------------------------------------------------------
# Exact persistent state


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes on the fullest device of a pytree of shapes (anything with .shape/.dtype) placed by `shardings`."""
    sizes = jax.tree.map(lambda x, s: math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize, tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def _shapes(specs: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=is_spec)


def _spec_shardings(specs: Any, mesh: Any) -> Any:
    return param_shardings(specs, mesh)


def _count(specs: Any) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=is_spec))


def dtype_name(name: str, platform: Platform) -> str:
    """A config dtype ("auto" = bfloat16 on accelerators, float32 on the CPU) as a concrete name."""
    if name == "auto":
        return "float32" if platform == "cpu" else "bfloat16"
    return name


def abstract_train_state(cfg: TrainConfig, trainable: Any, trainable_shardings: Any, mesh: Any) -> tuple[Any, Any]:
    """The TrainState's shapes and shardings for these trainable weights, built by the trainer's own functions."""
    total = cfg.train.steps * cfg.train.num_iterations * cfg.train.minibatches
    optimizer = make_optimizer(cfg.optim, total)
    state = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.train.seed), trainable)
    return state, state_shardings(state, optimizer, trainable_shardings, NamedSharding(mesh, PartitionSpec()))


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"


def _split_text(mesh: tuple[int, int, int]) -> str:
    parts = [f"{name}={size}" for name, size in zip(MESH_AXES, mesh) if size > 1 and name != "data"]
    return f"sharded {' '.join(parts)}" if parts else "replicated on every device"


# ----------------------------------------------------------------------------------------------------------
# Transient formulas (see the module docstring)


@dataclasses.dataclass(frozen=True)
class Dims:
    """A model's activation widths on one device: D whole (the rows take fsdp), heads, F and V split by `tensor` ways
    (K/V heads fewer than `tensor` stay whole)."""

    D: float
    N: float
    NH: float
    KH: float
    F: float
    V: float
    L: int

    @classmethod
    def of(cls, c: ModelConfig, tensor: int = 1) -> Dims:
        div = lambda n, k: n / k if n % k == 0 else n
        return cls(
            c.dim,
            div(c.num_heads, tensor),
            div(c.num_heads, tensor) * c.head_dim,
            div(c.num_kv_heads, tensor) * c.head_dim,
            div(c.mlp_dim, tensor),
            div(c.vocab_size, tensor),
            c.num_layers,
        )


def layer_bytes_per_token(d: Dims, b: int) -> float:
    """s_layer: bytes one layer keeps per token for its backward pass without remat."""
    return b * (5 * d.D + 4 * d.NH + 3 * d.KH + 7 * d.F) + 8 * d.D


def saved_bytes_per_token(d: Dims, b: int, remat: str) -> tuple[float, float]:
    """(s_saved, s_recompute) per token and layer under a remat policy."""
    layer = layer_bytes_per_token(d, b)
    if remat == "full":
        return b * d.D, layer
    if remat == "dots":
        return b * (3 * d.D + d.NH + 2 * d.KH + 2 * d.F), layer
    return layer, 0.0


def forward_bytes(d: Dims, rows: int, T: int, head_tokens: int, b: int) -> float:
    """fwd(rows, T): the working set of a forward pass that keeps nothing for a backward: the residual stream and its
    normed copy, plus the largest of one layer's projections and MLP, its attention scores, one logits chunk."""
    stream = 2 * rows * T * d.D * b
    layer = rows * T * b * (d.NH + 2 * d.KH + 3 * d.F)
    attention = 8 * rows * d.N * T * T
    head = 8 * min(rows * head_tokens * d.V, DEFAULT_CHUNK_ELEMENTS)
    return stream + max(layer, attention, head)


def backward_bytes(d: Dims, rows: int, T: int, head_tokens: int, b: int, remat: str) -> float:
    """The backward of one micro-batch: the saved activations of every layer, then the larger of one layer's
    rematerialised activations with its attention scores and the vocabulary head's chunk (they run at different
    times), and the final hidden states with their float32 gradient."""
    saved, recompute = saved_bytes_per_token(d, b, remat)
    layer = rows * T * recompute + 12 * rows * d.N * T * T
    head = 12 * min(rows * head_tokens * d.V, DEFAULT_CHUNK_ELEMENTS)
    return rows * T * d.L * saved + max(layer, head) + rows * T * d.D * (b + 4)


def old_logp_pass(cfg: TrainConfig) -> bool:
    """Whether the update runs a forward over the whole batch for the old policy's log-probs before its updates."""
    return cfg.grpo.old_logp == "recompute" and cfg.train.num_iterations * cfg.train.minibatches > 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def fmt_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


# ----------------------------------------------------------------------------------------------------------
# The plan


def plan(cfg: TrainConfig, models: Models, devices: int, platform: Platform, budget: Budget | None = None) -> Plan:
    """Per-device memory of `cfg` on `devices` devices of `platform` (pure arithmetic: nothing is allocated)."""
    sizes = check_mesh_fits(cfg, devices)
    data, fsdp, t = sizes
    mesh = AbstractMesh(sizes, MESH_AXES)
    pc = dataclasses.replace(models.policy, remat=cfg.model.remat)
    compute = dtype_name(cfg.model.compute_dtype, platform)
    b = 2 if compute == "bfloat16" else 4
    lora = cfg.model.lora
    lines: list[Line] = []
    add = lambda phase, name, n, detail: lines.append(Line(phase, name, int(n), detail))
    split = _split_text(sizes)

    specs = abstract(pc)
    wsh = weight_shardings(pc, mesh)
    n_params = _count(specs)
    layer_specs = specs.layers
    layer_bytes_compute = per_device_bytes(_shapes(layer_specs, jnp.dtype(compute)), wsh.layers)
    policy_bytes_compute = per_device_bytes(_shapes(specs, jnp.dtype(compute)), wsh)

    # Persistent: trainable weights and their optimizer state, the frozen base, the reference, the verifiers.
    if lora is None:
        trainable = _shapes(specs, jnp.float32)
        state, ssh = abstract_train_state(cfg, trainable, wsh, mesh)
        trainable_bytes = per_device_bytes(state.params, ssh.params)
        add("persistent", "parameters", trainable_bytes, f"float32 master weights, {_fmt_count(n_params)}, {split}")
    else:
        adapter_specs = abstract_adapters(pc, lora)
        trainable = _shapes(adapter_specs, jnp.float32)
        state, ssh = abstract_train_state(cfg, trainable, _spec_shardings(adapter_specs, mesh), mesh)
        trainable_bytes = per_device_bytes(state.params, ssh.params)
        add("persistent", "frozen base", policy_bytes_compute, f"{compute}, {_fmt_count(n_params)}, {split}")
        add(
            "persistent",
            "LoRA adapters",
            trainable_bytes,
            f"float32, rank {lora.rank} on {','.join(lora.targets)}: {_fmt_count(_count(adapter_specs))}",
        )
    opt_bytes = per_device_bytes(state.opt_state, ssh.opt_state)
    opt_bytes += per_device_bytes((state.step, state.rng), (ssh.step, ssh.rng))
    add("persistent", "optimizer state", opt_bytes, "AdamW first and second moments, float32")
    needs_ref = cfg.grpo.beta > 0 or (cfg.train.heldout_every > 0 and cfg.model.reference is not None)
    if needs_ref and lora is None:
        what = "copy of the initial policy" if cfg.model.reference == "policy" else cfg.model.reference
        add("persistent", "reference", policy_bytes_compute, f"{compute} {what}")
    elif needs_ref:
        add("persistent", "reference", 0, "the frozen base without adapters (no copy)")
    for vc, vm in zip(cfg.reward.verifiers, models.verifiers):
        if vc.served:
            where = f"{vc.server_model} on the server at {vc.url}"
            add("persistent", f"served verifier {vc.name}", 0, f"{where}: no memory on this device")
            continue
        vdtype = dtype_name(vc.dtype, platform)
        vbytes = per_device_bytes(_shapes(abstract(vm), jnp.dtype(vdtype)), weight_shardings(vm, mesh))
        add("persistent", f"verifier {vc.name}", vbytes, f"{vc.model}, {vdtype}, {_fmt_count(vm.num_params())}")

    # Shapes of a step.
    G, B = cfg.sampling.num_samples, cfg.train.prompts_per_step
    R = B * G
    P = bucket_length(cfg.data.max_prompt_tokens)
    n_new = cfg.sampling.max_new_tokens
    T = P + n_new
    sample_ways = data * fsdp
    update_ways = math.prod(dict(zip(MESH_AXES, sizes))[a] for a in UPDATE_ROW_AXES)
    R_s, B_s = _ceil_div(R, sample_ways), _ceil_div(B, sample_ways)
    M, K = cfg.train.minibatches, cfg.train.micro_batches
    R_u = _ceil_div(R, update_ways)
    r = _ceil_div(R // (M * K), update_ways)
    # The update's activations: rows over UPDATE_ROW_AXES, heads and MLP over tensor, the model width whole.
    d_u = Dims.of(pc, tensor=t)
    shapes = (
        f"{B} prompts x {G} samples = {R} rows of {P} prompt + {n_new} new tokens; per device {R_s} rows while "
        f"sampling, {R_u} in the update ({M} minibatch(es) x {K} micro-batch(es) of {r})"
    )

    # Weights as one device holds them once gathered over fsdp (still split over tensor), in the compute dtype.
    whole = weight_shardings(pc, AbstractMesh((data * fsdp, 1, t), MESH_AXES))
    gathered_layers = per_device_bytes(_shapes(layer_specs, jnp.dtype(compute)), whole.layers)
    tied = specs.lm_head is None
    gathered_head = per_device_bytes(
        _shapes(specs.embed if tied else specs.lm_head, jnp.dtype(compute)), whole.embed if tied else whole.lm_head
    )

    # Sampling: the layers decode in the layout the sampler picks for the platform, a copy placed by the rules.
    layout = decode_layout.resolve("auto", platform)
    decode_copy = 0
    if layout != "stacked":
        decode_specs = decode_layout.abstract(pc, layout, jnp.dtype(compute)).layers
        decode_copy = per_device_bytes(
            _shapes(decode_specs, jnp.dtype(compute)), weight_shardings(pc, mesh, layout=layout).layers
        )
    copies, what = 0, []
    if lora is not None:  # assumed: the adapters merged into one copy of the layers (per-layer layout off TPUs)
        copies += decode_copy or layer_bytes_compute
        what.append(f"{compute} layers with the adapters merged")
    else:
        if compute != "float32":
            copies += policy_bytes_compute
            what.append(f"{compute} compute copy")
        if decode_copy:
            copies += decode_copy
            what.append(f"{layout} decode copy of the layers")
    add("sampling", "weight copies", copies, " + ".join(what) or "none (float32 weights decode stacked)")
    L = pc.num_layers
    if fsdp > 1:
        # Decode steps split their rows over fsdp, so they read whole weights: the sampler gathers the LM head and,
        # in the per-layer layouts, every layer once per call (`decode_layout.gather_width`); the prefill's and the
        # stacked layout's scans gather one layer at a time.
        per_layer = layout != "stacked"
        held = "the layers and the LM head" if per_layer else "the LM head"
        add(
            "sampling",
            "gathered weights",
            gathered_layers / L + gathered_head + (gathered_layers if per_layer else 0),
            f"{held} gathered over fsdp for decoding, one layer for the prefill",
        )
    d_s = Dims.of(pc, tensor=t)
    KH = d_s.KH
    kv = 2 * L * R_s * KH * b * (P + n_new) + 2 * L * B_s * KH * b * P
    add("sampling", "KV cache", kv, f"{R_s} rows x {P + n_new} tokens x {L} layers, {compute}")
    prefill = forward_bytes(d_s, B_s, P, 0, b)
    add("sampling", "decode temporaries", 12 * d_s.V * R_s + prefill, f"logits of {R_s} rows; prefill")

    # Scoring: one block of each verifier at a time (the largest counts), and the policy's own forward for
    # policy-side reward terms.
    scoring: list[tuple[float, str]] = []
    for vc, vm in zip(cfg.reward.verifiers, models.verifiers):
        if vc.served:  # scored by its server
            continue
        vb = 2 if dtype_name(vc.dtype, platform) == "bfloat16" else 4
        resp = bucket_length(min(vc.max_length, n_new))
        Tv = P + resp
        rows = _ceil_div(min(R, max(1, DEFAULT_BLOCK_TOKENS // Tv)), update_ways)
        d_v = Dims.of(vm, tensor=t)
        scoring.append((forward_bytes(d_v, rows, Tv, resp, vb), f"verifier {vc.name}: {rows} rows x {Tv} tokens"))
    if cfg.reward.policy_stats:  # a term reads the policy's own forward over its responses
        scoring.append((forward_bytes(d_u, R_u, T, n_new, b), f"policy forward, {R_u} rows x {T} tokens"))
    if scoring:
        worst = max(scoring)
        add("scoring", "forward", worst[0], worst[1])

    # Update.
    accumulate = K > 1
    add(
        "update",
        "gradients",
        trainable_bytes * (2 if accumulate else 1),
        "float32" + (", accumulator + current micro-batch" if accumulate else ""),
    )
    if lora is None and compute != "float32":
        add("update", "compute copy", policy_bytes_compute, f"{compute} weights the loss reads")
    if fsdp > 1:  # the rows are split over fsdp, so each device gathers the weights it multiplies them with
        gathered = (gathered_layers / L + gathered_head) * (b + 4) / b
        add(
            "update",
            "gathered weights",
            gathered,
            "one layer and the LM head gathered over fsdp, their float32 gradients",
        )
    backward = backward_bytes(d_u, r, T, n_new, b, cfg.model.remat)
    if lora is not None:  # x @ A of every target, kept for the backward
        backward += r * T * L * b * lora.rank * 2 * len(lora.targets)
    # Forwards over the whole batch before the updates: the reference's (grpo.beta > 0) and the old policy's
    # (grpo.old_logp=recompute with more than one optimizer update; with one, the loss's own forward serves).
    passes = [name for name, runs in (("reference", cfg.grpo.beta > 0), ("old", old_logp_pass(cfg))) if runs]
    forward = forward_bytes(d_u, R_u, T, n_new, b) if passes else 0
    # The optimizer's float32 update tree lives after the backward pass has freed the activations.
    parts = {
        "backward of one micro-batch": backward,
        f"forward over all rows ({' and '.join(passes) or 'none'} log-probs)": forward,
        "the optimizer's float32 update tree": trainable_bytes,
    }
    which = max(parts, key=parts.__getitem__)
    add("update", "activations", parts[which], f"remat {cfg.model.remat}: the largest is {which}")

    saved, recompute = saved_bytes_per_token(d_u, b, cfg.model.remat)
    formulas = (
        f"activations = max(backward {fmt_bytes(backward)}, forward {fmt_bytes(forward)}, optimizer update "
        f"{fmt_bytes(trainable_bytes)}); backward = r T L s_saved + max(r T s_recompute + 12 r N T^2, "
        f"12 min(r n V, 2^24)) + r T D (b + 4) with r={r}, T={T}, L={L}, "
        f"s_saved={saved / 1024:.1f} KiB, s_recompute={recompute / 1024:.1f} KiB (remat {cfg.model.remat}), "
        f"and per device N={d_u.N:g}, D={d_u.D:g}, V={d_u.V:g}, n={n_new}, b={b}",
        f"s_layer = b (5 D + 4 N H + 3 K H + 7 F) + 8 D = {layer_bytes_per_token(d_u, b) / 1024:.1f} KiB per token "
        "and layer",
        f"forward = 2 R_u T D b + max(R_u T b (N H + 2 K H + 3 F), 8 R_u N T^2, 8 min(R_u n V, 2^24)) with R_u={R_u}"
        + ("" if passes else " (not run: no reference, and the old log-probs come from the loss's own forward)"),
        f"KV cache = 2 L R_s K H b S + 2 L B_s K H b P with R_s={R_s}, K H={KH:g}, S={P + n_new}, B_s={B_s}, P={P}",
    )
    return Plan(tuple(lines), devices, sizes, platform, compute, budget, shapes, formulas)


# ----------------------------------------------------------------------------------------------------------
# What would make it fit


def with_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """`cfg` with `key.sub=value` overrides applied and validated (CmeError when the result is invalid)."""
    return configtools.from_dict(TrainConfig, configtools.apply_overrides(configtools.to_dict(cfg), overrides))


def _doublings(start: int, ok: Callable[[int], bool], limit: int = 64) -> list[int]:
    out, value = [], start * 2
    while value <= limit * start and ok(value):
        out.append(value)
        value *= 2
    return out


def candidate_changes(cfg: TrainConfig, devices: int) -> list[tuple[str, list[str]]]:
    """Single changes, least disruptive first: more FSDP, remat, micro-batches, fewer rows, LoRA."""
    data, fsdp, _ = check_mesh_fits(cfg, devices)
    t = cfg.train
    rows = t.prompts_per_step * cfg.sampling.num_samples
    out: list[tuple[str, list[str]]] = []
    if data > 1:
        out.append(("shard the weights over every data-parallel device", ["mesh.data=1", f"mesh.fsdp={data * fsdp}"]))
    if cfg.model.remat == "none":
        out.append(("rematerialise matmul outputs only", ["model.remat=dots"]))
    if cfg.model.remat != "full":
        out.append(("rematerialise every layer in the backward pass", ["model.remat=full"]))
    per_update = rows // t.minibatches
    for k in _doublings(t.micro_batches, lambda k: per_update % k == 0 and per_update // k >= data):
        out.append((f"{k} micro-batches per update", [f"train.micro_batches={k}"]))
    b = t.prompts_per_step
    while b > 1:
        b //= 2
        r = b * cfg.sampling.num_samples
        if b % (data * fsdp) or r % (t.minibatches * t.micro_batches):
            continue
        out.append((f"{b} prompts per step", [f"train.prompts_per_step={b}"]))
    if cfg.model.lora is None:
        lora = "model.lora={rank: 16, alpha: 32}"
        out.append(("LoRA on a frozen base", [lora]))
    return out


def first_fix(cfg: TrainConfig, models: Models, devices: int, platform: Platform, budget: Budget) -> str:
    """The first change (or, failing any single one, the first combination) that makes the plan fit, as one phrase."""

    def fits(overrides: Sequence[str]) -> Plan | None:
        try:
            p = plan(with_overrides(cfg, overrides), models, devices, platform, budget)
        except CmeError:
            return None
        return p if p.verdict == "fits" else None

    changes = candidate_changes(cfg, devices)
    for what, overrides in changes:
        p = fits(overrides)
        if p is not None:
            return f"{what} ({' '.join(overrides)}): peak {fmt_bytes(p.peak)}"
    combined: list[str] = []
    for _, overrides in changes:  # later changes of a kind (more micro-batches, fewer rows) replace earlier ones
        keys = {o.split("=", 1)[0] for o in overrides}
        trial = [o for o in combined if o.split("=", 1)[0] not in keys] + overrides
        try:
            p = plan(with_overrides(cfg, trial), models, devices, platform, budget)
        except CmeError:
            continue
        combined = trial
        if p.verdict == "fits":
            return f"no single change fits; together: {' '.join(trial)}: peak {fmt_bytes(p.peak)}"
    return f"nothing tried fits on {devices} devices; use more devices or smaller models"


# ----------------------------------------------------------------------------------------------------------
# Output


PERSISTENT_SHORT = {"optimizer state": "optimizer", "frozen base": "base", "LoRA adapters": "adapters"}


def verdict_text(p: Plan) -> str:
    if p.budget is None:
        return "unknown: this backend does not report its memory (pass --device-memory)"
    share = f"{100 * p.peak / p.budget.bytes:.0f}% of {_gib(p.budget.bytes)} GiB ({p.budget.source})"
    if p.verdict == "fits":
        return f"fits: {share}"
    if p.verdict == "tight":
        return f"tight: {share}, less than {100 * HEADROOM:.0f}% left for XLA's workspaces"
    return f"does not fit: {share}"


def format_plan(p: Plan, title: str, fix: str | None = None) -> str:
    """The table a person reads: every line with its bytes and what it holds, the peak and the verdict."""
    w = max(26, *(len(line.name) for line in p.lines))
    out = [
        title,
        f"  mesh data={p.mesh[0]} fsdp={p.mesh[1]} tensor={p.mesh[2]} on {p.devices} {p.platform} "
        f"device(s), compute {p.compute_dtype}",
        f"  {p.shapes}",
        "",
        f"  {'per device':{w + 2}} {'GiB':>8}  holds",
    ]
    for phase in ("persistent", *PHASES):
        rows = [line for line in p.lines if line.phase == phase]
        if not rows:
            continue
        mark = " <- peak" if phase == p.peak_phase else ""
        out.append(f"  {phase:{w + 2}} {_gib(p.total(phase)):>8}{mark}")
        out.extend(f"    {line.name:{w}} {_gib(line.bytes):>8}  {line.detail}" for line in rows)
    out.append("")
    out.append(
        f"  peak = persistent {_gib(p.persistent)} + {p.peak_phase} {_gib(p.total(p.peak_phase))} = "
        f"{_gib(p.peak)} GiB per device"
    )
    out.append(f"  verdict: {verdict_text(p)}")
    if fix:
        out.append(f"  first change that fits: {fix}")
    out.append("")
    out.append("  formulas (bytes per device; see cme_jax/memory.py):")
    out.extend(f"    {f}" for f in p.formulas)
    return "\n".join(out)


def summary(p: Plan) -> list[str]:
    """Three short lines (persistent state, phases, peak and verdict) for a config's header and the trainer's log."""
    persistent = [
        f"{PERSISTENT_SHORT.get(line.name, line.name)} {_gib(line.bytes)}"
        for line in p.lines
        if line.phase == "persistent"
    ]
    phases = []
    for phase in PHASES:
        rows = [line for line in p.lines if line.phase == phase]
        if rows:
            biggest = max(rows, key=lambda line: line.bytes)
            phases.append(f"{phase} {_gib(p.total(phase))} ({biggest.name} {_gib(biggest.bytes)})")
    return [
        ", ".join(persistent) + " GiB;",
        ", ".join(phases) + " GiB;",
        f"peak {_gib(p.peak)} GiB in the {p.peak_phase} phase: {verdict_text(p)}",
    ]


# ----------------------------------------------------------------------------------------------------------
# The trainer's check


def start_check(cfg: TrainConfig) -> str | None:
    """The trainer's memory check before any weight loads: one log line, None when skipped, CmeError when the run
    cannot fit (only where the device memory is known: accelerators, or train.device_memory)."""
    setting = cfg.train.device_memory
    if setting == "off":
        return None
    platform = local_platform()
    if setting == "auto":
        budget = device_budget() if platform != "cpu" else None
        if budget is None:
            return None
    else:
        budget = Budget(configtools.parse_size(setting, "train.device_memory"), f"train.device_memory={setting}")
    models = read_models(cfg)
    p = plan(cfg, models, jax.device_count(), platform, budget)
    if p.verdict == "does not fit":
        fix = first_fix(cfg, models, jax.device_count(), platform, budget)
        raise CmeError(
            f"this run needs about {_gib(p.peak)} GiB per device ({p.peak_phase} peak) but {_gib(budget.bytes)} GiB "
            f"are available ({budget.source}); first change that fits: {fix}; `python -m cme_jax.plan --config ...` "
            "shows the breakdown, train.device_memory=off skips this check"
        )
    return f"memory plan per device: {summary(p)[-1]}"


# ----------------------------------------------------------------------------------------------------------
# XLA's own numbers


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """XLA's memory analysis of one compiled program on one device."""

    name: str
    arguments: int
    outputs: int
    temporaries: int
    aliased: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased


def compiled_memory(cfg: TrainConfig, models: Models, p: Plan) -> list[ProgramMemory]:
    """Compile (never run) the policy's sampling and update programs for this machine's devices, with the trainer's
    shardings, and return XLA's memory analysis of each. Verifier scoring is not compiled."""
    from cme_jax.models.sharding import batch_sharding, make_mesh, replicated
    from cme_jax.train_step import StepShardings, build_step, compute_params, join_rollout

    if cfg.model.lora is not None:
        raise CmeError("--compile compiles full fine-tuning steps only; plan a LoRA run without --compile")
    if p.platform != local_platform() or p.devices != jax.device_count():
        raise CmeError(
            f"--compile builds the step for this machine's {jax.device_count()} {local_platform()} device(s); plan "
            f"with --platform {local_platform()} --devices {jax.device_count()} (or run it where the plan is for)"
        )
    mesh = make_mesh(*p.mesh)
    pc = dataclasses.replace(models.policy, remat=cfg.model.remat)
    wsh = weight_shardings(pc, mesh)
    rep, rows = replicated(mesh), batch_sharding(mesh, 1)
    state, ssh = abstract_train_state(cfg, _shapes(abstract(pc), jnp.float32), wsh, mesh)
    total = cfg.train.steps * cfg.train.num_iterations * cfg.train.minibatches
    optimizer = make_optimizer(cfg.optim, total)
    place = lambda tree, shardings: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
    state = place(state, ssh)
    ref = None
    if cfg.grpo.beta > 0:
        ref = place(jax.eval_shape(lambda w: compute_params(w, p.compute_dtype), state.params), wsh)
    sc = step_config(cfg, p.compute_dtype)
    shardings = StepShardings(state=ssh, rows=rows, replicated=rep, ref=wsh if ref is not None else None)
    fns = build_step(pc, sc, optimizer, pad_id=0, shardings=shardings)
    B, P = cfg.train.prompts_per_step, bucket_length(cfg.data.max_prompt_tokens)
    prompts = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=rows)
    pmask = jax.ShapeDtypeStruct((B, P), jnp.bool_, sharding=rows)
    stops = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=rep)
    ro = jax.eval_shape(fns.rollout, state, prompts, pmask, stops)
    batch = jax.eval_shape(lambda t, m, r: join_rollout(t, m, r, sc.group_size), prompts, pmask, ro)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows), batch)
    rewards = jax.ShapeDtypeStruct((B * sc.group_size,), jnp.float32, sharding=rows)
    programs = {
        "sampling": fns.rollout.lower(state, prompts, pmask, stops),
        "update": fns.update.lower(state, batch, rewards, ref),
    }
    out = []
    for name, lowered in programs.items():
        m = lowered.compile().memory_analysis()
        out.append(
            ProgramMemory(
                name, m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes, m.alias_size_in_bytes
            )
        )
    return out


def policy_estimate(p: Plan, phase: Phase) -> int:
    """The plan's counterpart of one compiled policy program: the arrays it reads (the policy's weights for sampling;
    its whole state and the reference for the update) and the phase's temporaries."""
    reads = ("parameters", "frozen base", "LoRA adapters")
    if phase == "update":
        reads += ("optimizer state", "reference")
    return sum(line.bytes for line in p.lines if line.phase == "persistent" and line.name in reads) + p.total(phase)


def format_xla(programs: Sequence[ProgramMemory], p: Plan) -> str:
    """XLA's numbers beside the plan's, per program."""
    out = ["  XLA's memory analysis (compiled for this machine, not run), per device:"]
    out.append(f"    {'program':10} {'arguments':>11} {'outputs':>11} {'temporaries':>11} {'peak':>11} {'planned':>11}")
    for m in programs:
        planned = policy_estimate(p, m.name)  # type: ignore[arg-type]
        cells = [fmt_bytes(x) for x in (m.arguments, m.outputs, m.temporaries, m.peak, planned)]
        out.append(f"    {m.name:10} " + " ".join(f"{c:>11}" for c in cells))
    out.append(
        "    peak = arguments + outputs + temporaries - aliased (donated); planned = the arrays the program reads"
    )
    out.append("    + the phase's temporaries")
    return "\n".join(out)
