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

import jax
import jax.numpy as jnp

from cme_jax.checkpoint import CheckpointManager, checkpoint_dir
from cme_jax.errors import CmeError, cli_main
from cme_jax.models.families import config_from_hf
from cme_jax.models.sharding import is_spec
from cme_jax.models.transformer import ModelConfig, Weights, abstract
from cme_jax.models.weights import save_hf_checkpoint
from cme_jax.sources import load_tokenizer, resolve

ExportDtype = Literal["float32", "bfloat16"]
_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def host_params_abstract(cfg: ModelConfig) -> Weights:
    """float32 ShapeDtypeStructs without shardings: restore reads them as host numpy arrays."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract(cfg, jnp.float32), is_leaf=is_spec)


def export_checkpoint(
    run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, dtype: ExportDtype = "float32"
) -> tuple[Path, int]:
    """Write the policy of `step` (default: latest) as a HF directory; returns (out_dir, step)."""
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
        tokenizer = load_tokenizer(src)
        # bf16 -> f32 is exact, so reading every weight as float32 loses nothing whatever the run trained in.
        restored = mngr.restore({"params": host_params_abstract(cfg)}, step, partial=True)
    out = save_hf_checkpoint(out_dir, restored.state["params"], cfg, src.hf_config, tokenizer, dtype=_DTYPES[dtype])
    return out, restored.step


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
