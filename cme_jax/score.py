"""Score (prompt, response) pairs with one or more verifier LLMs (Cross-Model Entropy), without training.

    python -m cme_jax.score --input rows.jsonl --output scored.jsonl --verifier gemma3-270m \
        --context plain --template "Question: {prompt}\nAnswer:"
    python -m cme_jax.score --input rows.jsonl --output scored.jsonl --config verifiers.yaml

Each input line is a JSON object with string fields `prompt` and `response` (an optional boolean `stopped`
says whether the response ended on its own; it matters only with score_eos). Every row is written back
with `cme` (the weighted sum over verifiers) and `cme_<name>` per verifier: the mean log-prob of the
response's tokens under that verifier. Empty responses get the empty-response reward. Useful as a quality
filter for generated data. The YAML config holds `verifiers:` (a list of specs or mappings with name,
model, weight, context, template, score_eos, dtype, max_length, contrastive) and optionally `empty_reward`
and `batch_size`, at the top level or under `reward:`.
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

from cme_jax.errors import CmeError, cli_main
from cme_jax.scoring import VerifierConfig, check_finite, load_verifier, score_texts
from cme_jax.tokens import DEFAULT_PLAIN_TEMPLATE

CONFIG_KEYS = ("verifiers", "empty_reward", "batch_size")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL rows with string `prompt` and `response` fields (blank lines skipped)."""
    if not path.is_file():
        raise CmeError(f"input file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CmeError(f"{path}:{n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise CmeError(f"{path}:{n} must be a JSON object with 'prompt' and 'response'")
            for key in ("prompt", "response"):
                if not isinstance(row.get(key), str):
                    raise CmeError(f"{path}:{n} needs a string {key!r} field")
            if "stopped" in row and not isinstance(row["stopped"], bool):
                raise CmeError(f"{path}:{n}: 'stopped' must be true or false")
            rows.append(row)
    if not rows:
        raise CmeError(f"{path} holds no rows")
    return rows


def read_config(path: Path) -> dict[str, Any]:
    """The verifier settings of a YAML file (top level or its `reward:` section)."""
    import yaml

    if not path.is_file():
        raise CmeError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CmeError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CmeError(f"{path} must hold a mapping with a 'verifiers' list")
    if isinstance(data.get("reward"), dict):
        data = data["reward"]
        data = {k: v for k, v in data.items() if k in CONFIG_KEYS}  # other reward keys belong to training
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise CmeError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(CONFIG_KEYS)}")
    return data


def verifier_configs(args: argparse.Namespace, config: dict[str, Any]) -> list[VerifierConfig]:
    """Verifiers from the config file, then one per --verifier with the command-line settings."""
    out = []
    listed = config.get("verifiers") or []
    if not isinstance(listed, list):
        raise CmeError("config: 'verifiers' must be a list")
    fields = {f.name for f in dataclasses.fields(VerifierConfig)}
    try:
        for i, v in enumerate(listed):
            if isinstance(v, str):
                v = {"model": v}
            if not isinstance(v, dict):
                raise CmeError(f"config: verifiers[{i}] must be a model spec or a mapping")
            unknown = sorted(set(v) - fields)
            if unknown:
                raise CmeError(f"config: verifiers[{i}] has unknown key {unknown[0]!r}; allowed: {', '.join(fields)}")
            if "model" not in v:
                raise CmeError(f"config: verifiers[{i}] needs a 'model'")
            out.append(VerifierConfig(**v))
        for spec in args.verifier:
            kw: dict[str, Any] = {"model": spec, "context": args.context, "template": args.template}
            kw.update({"dtype": args.dtype, "score_eos": args.score_eos, "max_length": args.max_length})
            kw["contrastive"] = args.contrastive
            out.append(VerifierConfig(**kw))
    except ValueError as e:
        raise CmeError(str(e)) from None
    if not out:
        raise CmeError("no verifier given; pass --verifier SPEC or a --config file with 'verifiers'")
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CmeError(f"two verifiers are named {dup[0]!r}; give distinct 'name's in the config file")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.score", description=__doc__.split("\n")[0])
    p.add_argument("--input", type=Path, required=True, help="JSONL with 'prompt' and 'response' per line")
    p.add_argument("--output", type=Path, required=True, help="JSONL written with cme and cme_<name> added")
    p.add_argument("--verifier", action="append", default=[], help="model spec; repeat for several verifiers")
    p.add_argument("--context", choices=["auto", "chat", "plain"], default="auto", help="for --verifier models")
    p.add_argument(
        "--template", default=DEFAULT_PLAIN_TEMPLATE, help="plain context with {prompt}, for --verifier models"
    )
    p.add_argument("--config", type=Path, help="YAML with per-verifier settings and weights")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--max-length", type=int, default=1024, help="response tokens scored at most")
    p.add_argument("--score-eos", action="store_true", help="also score the end token of stopped responses")
    p.add_argument(
        "--contrastive", action="store_true", help="subtract each response's mean log-prob after an empty prompt"
    )
    p.add_argument("--batch-size", type=int, help="rows per forward (default 16, or the config's)")
    p.add_argument("--empty-reward", type=float, help="score of an empty response (default -10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    config = read_config(args.config) if args.config else {}
    vcfgs = verifier_configs(args, config)
    batch_size = args.batch_size if args.batch_size is not None else config.get("batch_size", 16)
    empty_reward = args.empty_reward if args.empty_reward is not None else config.get("empty_reward", -10.0)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CmeError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if isinstance(empty_reward, bool) or not isinstance(empty_reward, int | float) or not np.isfinite(empty_reward):
        raise CmeError(f"empty_reward must be a finite number, got {empty_reward!r}")
    rows = read_rows(args.input)
    if args.output.resolve() == args.input.resolve():
        raise CmeError("--output must differ from --input; the input is read while the output is written")

    from tqdm import tqdm

    prompts = [r["prompt"] for r in rows]
    responses = [r["response"] for r in rows]
    stopped = np.array([r.get("stopped", True) for r in rows], bool)
    total = np.zeros(len(rows), np.float64)
    empty = np.zeros(len(rows), bool)
    per: dict[str, np.ndarray] = {}
    for vc in vcfgs:
        verifier = load_verifier(vc)
        with tqdm(total=len(rows), desc=f"cme {vc.name}", unit="row", file=sys.stderr, disable=args.no_progress) as bar:
            s = score_texts(verifier, prompts, responses, stopped, batch_size=batch_size, progress=bar)
        check_finite(s.mean, ~s.empty, f"verifier {vc.name!r}")
        per[vc.name] = s.mean
        total += vc.weight * np.where(s.empty, 0.0, s.mean)
        empty |= s.empty
        del verifier
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
