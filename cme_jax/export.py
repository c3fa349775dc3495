"""Export a training checkpoint's policy as a Hugging Face model directory (safetensors, config, tokenizer), or a
LoRA run's adapter in PEFT's format.

    python -m cme_jax.export RUN_DIR OUT_DIR [--step N] [--dtype float32|bfloat16] [--format merged|peft]

Reads RUN_DIR/checkpoints/<step> (default: the latest complete step). The architecture and tokenizer come
from the policy spec recorded in the checkpoint's metadata ("model_spec"); the weights come from the
checkpoint (a LoRA run's adapters merged into that base). The result loads with
`transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`. With `--format peft` a LoRA run writes only its
adapter (adapter_config.json, adapter_model.safetensors), which `peft.PeftModel.from_pretrained(base, OUT_DIR)`
loads onto the base model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from cme_jax.checkpoint import CheckpointManager, checkpoint_dir
from cme_jax.errors import CmeError, cli_main
from cme_jax.models import lora as lora_lib
from cme_jax.models.families import config_from_hf, detect_prefix
from cme_jax.models.sharding import is_spec
from cme_jax.models.transformer import ModelConfig, Weights, abstract
from cme_jax.models.weights import load_weights, save_hf_checkpoint
from cme_jax.sources import ResolvedSource, load_tokenizer, open_store, resolve

ExportDtype = Literal["float32", "bfloat16"]
ExportFormat = Literal["merged", "peft"]
_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def host_params_abstract(cfg: ModelConfig) -> Weights:
    """float32 ShapeDtypeStructs without shardings: restore reads them as host numpy arrays."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract(cfg, jnp.float32), is_leaf=is_spec)


def restore_policy(
    mngr: CheckpointManager, meta: dict[str, Any], src: ResolvedSource, cfg: ModelConfig, step: int | None
) -> tuple[Weights, int]:
    """The float32 host weights of a run's policy at `step` and the step: the trained weights, or for a LoRA run
    (model.lora in the recorded config) the base of `src` with the checkpoint's adapters merged in."""
    lora = lora_lib.lora_from_config(meta.get("config"))
    if lora is None:
        # bf16 -> f32 is exact, so reading every weight as float32 loses nothing whatever the run trained in.
        restored = mngr.restore({"params": host_params_abstract(cfg)}, step, partial=True)
        return restored.state["params"], restored.step
    restored = mngr.restore({"params": lora_lib.host_adapters_abstract(cfg, lora)}, step, partial=True)
    base = load_weights(cfg, open_store(src), dtype=jnp.float32)
    merged = jax.jit(lora_lib.merge, static_argnums=2)(base, restored.state["params"], lora)
    return jax.tree.map(np.asarray, merged), restored.step


def export_checkpoint(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    dtype: ExportDtype = "float32",
    fmt: ExportFormat = "merged",
) -> tuple[Path, int]:
    """Write the policy of `step` (default: latest) as a HF directory, or with fmt="peft" a LoRA run's adapter as
    a PEFT adapter directory; returns (out_dir, step)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CmeError(f"run directory {run_dir} does not exist; pass the directory the trainer wrote")
    if not checkpoint_dir(run_dir).is_dir():
        raise CmeError(f"{run_dir} has no {checkpoint_dir(run_dir).name}/ directory; is it a training run directory?")
    with CheckpointManager(run_dir, read_only=True) as mngr:
        if mngr.latest_step() is None:
            raise CmeError(f"{checkpoint_dir(run_dir)} holds no complete checkpoint yet; train until the first save")
        meta = mngr.metadata(step)
        spec = meta.get("model_spec")
        if not isinstance(spec, str):
            raise CmeError(
                f"checkpoint metadata in {checkpoint_dir(run_dir)} has no model_spec, so the model cannot be "
                "rebuilt; export run directories written by cme_jax.train"
            )
        src = resolve(spec)
        cfg = config_from_hf(src.hf_config)
        if fmt == "peft":
            return _export_adapter(mngr, meta, src, cfg, out_dir, step, dtype)
        tokenizer = load_tokenizer(src)
        weights, step = restore_policy(mngr, meta, src, cfg, step)
    out = save_hf_checkpoint(out_dir, weights, cfg, src.hf_config, tokenizer, dtype=_DTYPES[dtype])
    return out, step


def _export_adapter(
    mngr: CheckpointManager,
    meta: dict[str, Any],
    src: ResolvedSource,
    cfg: ModelConfig,
    out_dir: str | Path,
    step: int | None,
    dtype: ExportDtype,
) -> tuple[Path, int]:
    """A LoRA run's adapters as a PEFT adapter directory, named after the base checkpoint's modules."""
    lora = lora_lib.lora_from_config(meta.get("config"))
    if lora is None:
        raise CmeError(
            f"{mngr.run_dir} fine-tuned every weight (its config has no model.lora), so it has no adapter to export; "
            "use --format merged"
        )
    restored = mngr.restore({"params": lora_lib.host_adapters_abstract(cfg, lora)}, step, partial=True)
    prefix = detect_prefix(open_store(src).names())
    out = lora_lib.save_peft(
        out_dir, restored.state["params"], cfg, lora, src.spec, prefix=prefix, dtype=_DTYPES[dtype]
    )
    return out, restored.step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="training run directory (holds checkpoints/)")
    p.add_argument("out_dir", help="where to write the Hugging Face model directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32", help="dtype of the written weights")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=get_args(ExportFormat),
        default="merged",
        help="merged: a full HF model (a LoRA run's adapters merged into its base); peft: a LoRA run's adapter only",
    )
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out, step = export_checkpoint(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype, fmt=args.fmt)
    what = "the PEFT adapter of step" if args.fmt == "peft" else "step"
    print(f"wrote {what} {step} of {args.run_dir} to {out} ({args.dtype})", file=sys.stderr)


if __name__ == "__main__":
    main()
