"""Score (prompt, response) pairs with one or more verifier LLMs (Cross-Model Entropy), without training.

    python -m cme_jax.score --input rows.jsonl --output scored.jsonl --verifier gemma3-270m \
        --verifier-context plain --verifier-template "Question: {prompt}\nAnswer:"
    python -m cme_jax.score --input rows.jsonl --output scored.jsonl --verifier-config verifiers.yaml

Each input line is a JSON object with string fields `prompt` and `response` (an optional boolean `stopped`
says whether the response ended on its own; it matters only with score_eos). Every row is written back
with `cme` (the weighted sum over verifiers) and `cme_<name>` per verifier: the mean log-prob of the
response's tokens under that verifier. Empty responses get the empty-response reward. Useful as a quality
filter for generated data. The verifier flags are those of `audit` and `evaluate` (`cme_jax.cli`; the short
forms --config, --context, --template, ... also work); the YAML file is a training config or holds its
`reward:` keys at the top level (`verifiers:`, a list of specs or mappings with name, model, weight, context,
template, score_eos, dtype, max_length, contrastive; `empty_reward`). The combination is the trainer's own
(`cme_jax.rewards.combine`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cme_jax.cli import add_verifier_args, verifier_reward
from cme_jax.errors import CmeError, cli_main
from cme_jax.files import read_records
from cme_jax.rewards import combine_host, text_inputs


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Records (JSONL, or a JSON list) with string `prompt` and `response` fields and an optional bool `stopped`."""
    rows = []
    for where, row in read_records(path, "input file"):
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise CmeError(f"{where} needs a string {key!r} field")
        if "stopped" in row and not isinstance(row["stopped"], bool):
            raise CmeError(f"{where}: 'stopped' must be true or false")
        rows.append(row)
    if not rows:
        raise CmeError(f"{path} holds no rows")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.score", description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, required=True, help="JSONL with 'prompt' and 'response' per line")
    p.add_argument("--output", type=Path, required=True, help="JSONL written with cme and cme_<name> added")
    add_verifier_args(p, short_aliases=True)
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward")
    p.add_argument("--empty-reward", type=float, help="score of an empty response (default: the config's, else -10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    rcfg = verifier_reward(args, groups=False)
    if args.empty_reward is not None:
        try:
            rcfg = dataclasses.replace(rcfg, empty_reward=args.empty_reward)
        except ValueError as e:
            raise CmeError(str(e)) from None
    if args.batch_size < 1:
        raise CmeError(f"--batch-size must be >= 1, got {args.batch_size}")
    rows = read_rows(args.input)
    if args.output.resolve() == args.input.resolve():
        raise CmeError("--output must differ from --input; the input is read while the output is written")

    prompts = [r["prompt"] for r in rows]
    responses = [r["response"] for r in rows]
    stopped = np.array([r.get("stopped", True) for r in rows], bool)
    kw = dict(batch_size=args.batch_size, progress=not args.no_progress)
    x = text_inputs(rcfg.verifiers, prompts, responses, stopped, **kw)
    parts = combine_host(rcfg, x)
    empty, total, empty_reward = parts.empty, parts.rewards, rcfg.empty_reward
    per = {vc.name: parts.components[f"cme/{vc.name}"] for vc in rcfg.verifiers}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            out = dict(row)
            out["cme"] = float(empty_reward) if empty[i] else float(total[i])
            for name, m in per.items():
                out[f"cme_{name}"] = float(empty_reward) if empty[i] else float(m[i])
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"scored {len(rows)} rows ({int(empty.sum())} empty) -> {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
