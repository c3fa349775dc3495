"""Export a training checkpoint's policy as a Hugging Face model directory (safetensors, config, tokenizer).

    python -m cme_jax.export RUN_DIR OUT_DIR [--step N] [--dtype float32|bfloat16]

Reads RUN_DIR/checkpoints/<step> (default: the latest complete step). The architecture and tokenizer come
from the policy spec recorded in the checkpoint's metadata ("model_spec"); the weights come from the
checkpoint. The result loads with `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp

from cme_jax.checkpoint import inspect_run, restore_run_policy
from cme_jax.errors import cli_main
from cme_jax.models.weights import save_hf_checkpoint

ExportDtype = Literal["float32", "bfloat16"]
_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def export_checkpoint(
    run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, dtype: ExportDtype = "float32"
) -> tuple[Path, int]:
    """Write the policy of `step` (default: latest) as a HF directory; returns (out_dir, step)."""
    run = inspect_run(run_dir, step)
    cfg, params, src, tokenizer = restore_run_policy(run)
    out = save_hf_checkpoint(out_dir, params, cfg, src.hf_config, tokenizer, dtype=_DTYPES[dtype])
    return out, run.step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="training run directory (holds checkpoints/)")
    p.add_argument("out_dir", help="where to write the Hugging Face model directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the latest)")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32", help="dtype of the written weights")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    out, step = export_checkpoint(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype)
    print(f"wrote step {step} of {args.run_dir} to {out} ({args.dtype})", file=sys.stderr)


if __name__ == "__main__":
    main()
