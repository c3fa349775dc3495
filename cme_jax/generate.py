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
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cme_jax.errors import CmeError, cli_main
from cme_jax.files import read_records
from cme_jax.models.sharding import batch_sharding
from cme_jax.sampling import SamplingConfig, prepare_decode, response_token_lists, sample_jit
from cme_jax.sources import LoadedModel, load_model
from cme_jax.tokens import (
    DEFAULT_PLAIN_TEMPLATE,
    PromptFormat,
    bucket_length,
    encode_prompts,
    left_pad,
    pad_id,
    stop_token_ids,
)


def default_dtype() -> Any:
    """bfloat16 on accelerators, float32 on the CPU."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def fit_prompts(ids: list[list[int]], max_new_tokens: int, max_position: int, truncate_left: bool) -> list[list[int]]:
    """Check that prompt + response fits the context window, truncating from the left only on request."""
    room = max_position - max_new_tokens
    if room < 1:
        raise CmeError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {max_position}-token "
            "context; lower it"
        )
    out = []
    for i, p in enumerate(ids):
        if not p:
            raise CmeError(f"prompt {i} is empty after tokenization; give every prompt some text")
        if len(p) > room:
            if not truncate_left:
                raise CmeError(
                    f"prompt {i} has {len(p)} tokens but only {room} fit with max_new_tokens={max_new_tokens} "
                    f"in the {max_position}-token context; shorten it or pass --truncate-left"
                )
            p = p[-room:]
        out.append(p)
    return out


def generate_responses(
    model: LoadedModel,
    prompts: Sequence[str],
    scfg: SamplingConfig,
    *,
    seed: int = 0,
    fmt: PromptFormat = "auto",
    template: str = DEFAULT_PLAIN_TEMPLATE,
    batch_size: int = 16,
    stop_strings: Sequence[str] = (),
    truncate_left: bool = False,
    progress: bool = False,
    mesh: Any = None,
) -> list[list[dict[str, Any]]]:
    """For each prompt, num_samples dicts with response text, token ids, stopped flag and summed log-prob.

    Prompts are sorted by length into batches of `batch_size` (the last one padded with repeats, so every batch
    has the same shape) and left-padded to a bucket length, so a run compiles one program per bucket. With a
    `mesh`, prompt rows are split over its data axes (place the weights with `load_model(..., mesh=mesh)`).
    With `progress`, one line per batch goes to stderr.
    """
    if not prompts:
        raise CmeError("no prompts given; pass at least one prompt")
    if batch_size < 1:
        raise CmeError(f"batch size must be >= 1, got {batch_size}")
    tok = model.tokenizer
    ids = encode_prompts(tok, prompts, fmt, template)
    ids = fit_prompts(ids, scfg.max_new_tokens, model.cfg.max_position, truncate_left)
    stops = np.asarray(stop_token_ids(tok, stop_strings), np.int32)
    pad = pad_id(tok)
    order = np.argsort([len(p) for p in ids], kind="stable")  # similar lengths share a bucket
    batch_size = min(batch_size, len(ids))
    rows_in = None
    if mesh is not None:
        rows_in = batch_sharding(mesh, 2)
        shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(rows_in.spec[0]))
        batch_size = -(-batch_size // shards) * shards  # every device gets whole rows
    results: list[list[dict[str, Any]]] = [[] for _ in prompts]
    rng = jax.random.key(seed)
    num_batches = -(-len(ids) // batch_size)
    G = scfg.num_samples
    t_start, n_tokens, seen_shapes = time.perf_counter(), 0, set()
    step_weights = prepare_decode(model.weights, model.cfg)  # once for all batches, not inside every call
    for b, start in enumerate(range(0, len(ids), batch_size)):
        idx = order[start : start + batch_size]
        batch = [ids[i] for i in idx]
        rows = len(batch)
        batch = batch + [batch[-1]] * (batch_size - rows)
        toks, mask = left_pad(batch, bucket_length(max(len(p) for p in batch)), pad)
        if rows_in is not None:
            toks, mask = jax.device_put(toks, rows_in), jax.device_put(mask, rows_in)
        t0 = time.perf_counter()
        key = jax.random.fold_in(rng, b)
        ro = sample_jit(model.weights, model.cfg, toks, mask, key, scfg, stops, pad, decode_weights=step_weights)
        resp = response_token_lists(ro)
        stopped, logps = np.asarray(ro.stopped), np.asarray(ro.logprobs)
        for j, i in enumerate(idx[:rows]):
            for g in range(G):
                r = j * G + g
                results[i].append(
                    {
                        "response": tok.decode(resp[r], skip_special_tokens=True),
                        "tokens": resp[r],
                        "stopped": bool(stopped[r]),
                        "logprob": float(logps[r].sum()),
                    }
                )
        if progress:
            dt = time.perf_counter() - t0
            lengths = np.asarray(ro.lengths)[: rows * G]
            n_tokens += int(lengths.sum())
            first = toks.shape not in seen_shapes  # this call compiled a program for the new prompt bucket
            seen_shapes.add(toks.shape)
            print(
                f"batch {b + 1}/{num_batches}: {rows} prompts x {G} samples, prompt bucket {toks.shape[1]}, "
                f"{int(lengths.sum())} tokens in {dt:.1f}s ({lengths.sum() / dt:.0f} tok/s"
                f"{', with compilation' if first else ''}), {stopped[: rows * G].mean():.0%} stopped; "
                f"total {n_tokens} tokens in {time.perf_counter() - t_start:.1f}s",
                file=sys.stderr,
            )
    return results


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
