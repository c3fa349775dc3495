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

import jax.numpy as jnp

from cme_jax.checkpoint import CheckpointManager, RunCheckpoint, inspect_run, restore_run_policy
from cme_jax.errors import CmeError, cli_main
from cme_jax.models import lora as lora_lib
from cme_jax.models.families import config_from_hf, detect_prefix
from cme_jax.models.weights import save_hf_checkpoint
from cme_jax.sources import open_store, resolve

ExportDtype = Literal["float32", "bfloat16"]
ExportFormat = Literal["merged", "peft"]
_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
    run = inspect_run(run_dir, step)
    if fmt == "peft":
        return _export_adapter(run, out_dir, dtype), run.step
    cfg, params, src, tokenizer = restore_run_policy(run)
    out = save_hf_checkpoint(out_dir, params, cfg, src.hf_config, tokenizer, dtype=_DTYPES[dtype])
    return out, run.step


def _export_adapter(run: RunCheckpoint, out_dir: str | Path, dtype: ExportDtype) -> Path:
    """A LoRA run's adapters as a PEFT adapter directory, named after the base checkpoint's modules."""
    lora = lora_lib.lora_from_config(run.config)
    if lora is None:
        raise CmeError(
            f"{run.run_dir} fine-tuned every weight (its config has no model.lora), so it has no adapter to export; "
            "use --format merged"
        )
    src = resolve(run.model_spec)
    cfg = config_from_hf(src.hf_config)
    with CheckpointManager(run.run_dir, read_only=True) as mngr:
        restored = mngr.restore({"params": lora_lib.host_adapters_abstract(cfg, lora)}, run.step, partial=True)
    prefix = detect_prefix(open_store(src).names())
    return lora_lib.save_peft(
        out_dir, restored.state["params"], cfg, lora, src.spec, prefix=prefix, dtype=_DTYPES[dtype]
    )


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
