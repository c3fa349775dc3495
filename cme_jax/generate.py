"""Generate responses with any model cme_jax can load, using the jitted sampler.

    python -m cme_jax.generate --model smollm2-135m-instruct --prompt "Name three primes."
    python -m cme_jax.generate --model Qwen/Qwen2.5-0.5B-Instruct --prompts in.jsonl --output out.jsonl \
        --num-samples 4 --temperature 0.8 --top-p 0.95 --max-new-tokens 256

Greedy when the temperature is 0 (the default). The model's chat template is used when it has one. Without
`--output` the responses are printed as text; `--output -` writes the JSONL rows to stdout instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from cme_jax.errors import CmeError, cli_main
from cme_jax.files import read_records
from cme_jax.sampling import SamplingConfig, default_dtype, generate_responses
from cme_jax.sources import load_model
from cme_jax.tokens import DEFAULT_PLAIN_TEMPLATE


def _read_prompts(path: Path) -> list[dict[str, Any]]:
    """Records with a string 'prompt' (or 'instruction') field; other fields are carried to the output."""
    rows = []
    for where, row in read_records(path, "prompt file"):
        text = row.get("prompt", row.get("instruction"))
        if not isinstance(text, str):
            raise CmeError(f"{where} needs a string 'prompt' (or 'instruction') field")
        rows.append({**row, "prompt": text})
    if not rows:
        raise CmeError(f"{path} holds no prompts; write one JSON object with a 'prompt' field per line")
    return rows


def _dtype(name: str) -> Any:
    return {"auto": default_dtype(), "float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hub id, local HF directory, .gguf file or embedded alias")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", type=Path, help="JSONL file with a 'prompt' field per line")
    p.add_argument("--output", type=Path, help="write JSONL here, '-' for stdout (default: print responses as text)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--stop", action="append", default=[], help="extra stop string (must be one token)")
    p.add_argument("--format", choices=["auto", "chat", "plain"], default="auto")
    p.add_argument("--template", default=DEFAULT_PLAIN_TEMPLATE, help="plain template with {prompt}")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--truncate-left", action="store_true", help="cut over-long prompts from the left")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        scfg = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            num_samples=args.num_samples,
        )
    except ValueError as e:
        raise CmeError(str(e)) from None
    if args.batch_size < 1:
        raise CmeError(f"--batch-size must be >= 1, got {args.batch_size}")
    rows = [{"prompt": args.prompt}] if args.prompt is not None else _read_prompts(args.prompts)
    prompts = [r["prompt"] for r in rows]
    model = load_model(args.model, dtype=_dtype(args.dtype))
    t0 = time.perf_counter()
    results = generate_responses(
        model,
        prompts,
        scfg,
        seed=args.seed,
        fmt=args.format,
        template=args.template,
        batch_size=args.batch_size,
        stop_strings=args.stop,
        truncate_left=args.truncate_left,
        progress=args.output is not None,
    )
    if args.output is None:
        for samples in results:
            for s in samples:
                print(s["response"])
                if len(samples) > 1:
                    print("-" * 40)
        return
    to_stdout = str(args.output) == "-"
    lines = []
    for row, samples in zip(rows, results):
        for g, s in enumerate(samples):
            out = {**row, "sample": g, "response": s["response"], "stopped": s["stopped"]}
            out.update(num_tokens=len(s["tokens"]) + s["stopped"], logprob=s["logprob"])
            lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    if to_stdout:
        sys.stdout.writelines(lines)
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("".join(lines), encoding="utf-8")
    where = "stdout" if to_stdout else args.output
    print(f"wrote {len(lines)} responses to {where} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
