"""How much memory a training run needs on each device, before any weight is downloaded.

    python -m cme_jax.plan --config configs/qwen2.5-7b-instruct_8gpu.yaml --platform gpu --devices 8 \\
        --device-memory 80GB --memory-fraction 0.95 [key.sub=value ...]

Prints, per device: the master weights, gradients, optimizer state, reference, each verifier, the KV cache at the
configured rows and lengths and the update's activations under the configured remat policy (their formulas with
this run's numbers), the peak against the device's memory, a verdict and the first change that would make it fit
(more FSDP, remat, micro-batches, fewer rows, LoRA). Persistent state is exact (abstract shapes under the trainer's
shardings); the transients are estimates (see cme_jax/memory.py). Only config.json files are read: from the Hub or
its cache, or from `--model-configs DIR` (DIR/ORG/NAME/config.json) offline. `--platform` (default: this machine's)
sets the dtypes ("auto" is bfloat16 on accelerators) and how JAX shares a GPU (75% unless
XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise). `--compile` also compiles the step's programs for this machine's
devices without running them and prints XLA's memory analysis beside the estimate. `--header` prints the plan as
the comment block the shipped configs carry; `--write-header` puts it into the config file.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from cme_jax.config import load_config
from cme_jax.errors import CmeError, cli_main

HEADER_BEGIN = "# Memory plan"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.plan", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the YAML")
    p.add_argument("--devices", type=int, help="devices the run uses (default: this machine's)")
    p.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="accelerator kind (default: this machine's)")
    p.add_argument("--device-memory", help="memory of one device, e.g. 80GB or 16GiB (default: what JAX reports)")
    p.add_argument("--memory-fraction", type=float, help="share of --device-memory JAX may use (GPU default 0.75)")
    p.add_argument("--model-configs", help="directory of ORG/NAME/config.json files read instead of the Hub")
    p.add_argument("--compile", action="store_true", help="also compile the step here and print XLA's numbers")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--header", action="store_true", help="print the plan as a config header comment")
    g.add_argument("--write-header", action="store_true", help="write that header into the config file")
    return p


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this plan (as recorded in config headers)."""
    parts = ["python -m cme_jax.plan", "--config", args.config]
    for flag in ("platform", "devices", "device_memory", "memory_fraction"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    return " ".join([*parts[:1], *map(shlex.quote, [*parts[1:], *args.overrides])])


def header_lines(args: argparse.Namespace, p) -> list[str]:
    """The comment block a config carries: the command, then the plan's two summary lines."""
    from cme_jax import memory

    return [
        f"{HEADER_BEGIN} per device, from",
        f"#   {command_line(args)}",
        *(f"#   {line}" for line in memory.summary(p)),
    ]


def replace_header(text: str, block: Sequence[str]) -> str:
    """`text` with its memory-plan comment block replaced by `block` (or inserted after the leading comments)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(HEADER_BEGIN)), None)
    if start is None:
        start = end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    else:
        end = start + 1
        while end < len(lines) and lines[end].startswith("#   "):
            end += 1
    return "\n".join([*lines[:start], *block, *lines[end:]]) + "\n"


def run(args: argparse.Namespace):
    """The plan for parsed arguments (and its fix when it does not fit)."""
    import jax

    from cme_jax import memory

    cfg = load_config(args.config, args.overrides)
    platform = args.platform or memory.local_platform()
    devices = args.devices if args.devices is not None else jax.device_count()
    if devices < 1:
        raise CmeError(f"--devices {devices}: give at least 1")
    if args.device_memory is not None:
        budget = memory.budget_from_size(args.device_memory, platform, args.memory_fraction)
    elif platform == memory.local_platform() and platform != "cpu" and devices <= jax.device_count():
        budget = memory.device_budget()
    else:
        budget = None
    models = memory.read_models(cfg, args.model_configs)
    p = memory.plan(cfg, models, devices, platform, budget)
    fix = memory.first_fix(cfg, models, devices, platform, budget) if p.verdict in ("does not fit", "tight") else None
    return cfg, models, p, fix


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg, models, p, fix = run(args)
    if args.header or args.write_header:
        block = header_lines(args, p)
        if args.write_header:
            path = Path(args.config)
            path.write_text(replace_header(path.read_text(), block))
            print(f"wrote the memory plan into {path}", file=sys.stderr)
        print("\n".join(block))
        return
    from cme_jax import memory

    title = f"Memory plan for {args.config}: {cfg.model.policy}" + (" with LoRA" if cfg.model.lora else "")
    print(memory.format_plan(p, title, fix))
    if args.compile:
        print()
        print(memory.format_xla(memory.compiled_memory(cfg, models, p), p))


if __name__ == "__main__":
    main()
