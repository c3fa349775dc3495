r"""Verifier audit: does a CME reward agree with human preferences, and does degenerate text game it?

    python -m cme_jax.audit --verifier gemma3-270m --verifier smollm2-135m-instruct \
        --verifier-template $'Question: {prompt}\nAnswer:' --out runs/audit
    python -m cme_jax.audit --verifier-config configs/demo_cpu.yaml --out runs/audit_demo
    python -m cme_jax.audit --verifier Qwen/Qwen2.5-0.5B-Instruct \
        --dataset HuggingFaceH4/ultrafeedback_binarized --split test_prefs --limit 500 --out runs/audit_uf

Inputs are preference pairs (prompt, chosen, rejected): by default the 48 pairs shipped with cme_jax
(`cme_jax/data/preference_pairs.jsonl`, usable offline), else `--pairs FILE.jsonl` or a Hub dataset
(`--dataset NAME --split SPLIT`, read with `datasets`). `chosen` and `rejected` are strings or chat message
lists (the last assistant message is the response; the first user message is the prompt when the record
has no `prompt`), as in HuggingFaceH4/ultrafeedback_binarized. Each chosen response is also rewritten seven
degenerate ways (`cme_jax.eval.rewrites`: one sentence repeated, cut mid-sentence, first sentence only, a
refusal, sentences shuffled, the answer to another prompt, padded with filler).

Verifiers are given as in training, with the flags `score` and `evaluate` share: `--verifier SPEC` with
`--verifier-context`/`--verifier-template` (auto context = the chat template when the model has one, else the
plain template; the short forms `--context`, `--template`, `--config` also work), and/or `--verifier-config
FILE`, a training config or any YAML with `reward.verifiers` (or top-level `verifiers`), whose weights and
`zscore` also define the combined reward (`cme_jax.rewards.combine`, as in training). Every verifier is scored
in two forms, with the code path training uses (`cme_jax.scoring.score_texts`): plain CME, the mean log-prob
per response token after the verifier's context, and contrastive CME, the same minus the response's mean
log-prob after the context of an empty prompt (`contrastive: true` in a verifier config; one extra pass).

Per verifier, form and (with several verifiers) their weighted combination, OUT receives: pairwise
accuracy P(CME(chosen) > CME(rejected)) with a 95% bootstrap interval over pairs (ties count half); for
each rewrite kind the share of pairs where the original beats its rewrite, with its interval; the
Spearman rank correlation of CME with response length in characters (`results.json`); per-pair texts and
scores (`items.jsonl`); `report.md` and `report.png`. A verifier that scores a rewrite kind above the
original on more than half the pairs gets a warning line (`start_audit` returns them to the trainer, which
runs the audit with `audit_at_start: true`). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cme_jax.cli import add_verifier_args, verifier_reward
from cme_jax.errors import CmeError, cli_main
from cme_jax.eval.audit import (
    SHIPPED_SOURCE,
    PreferencePair,
    load_hub_pairs,
    read_pairs_file,
    run_audit,
    shipped_pairs,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.audit", description=__doc__.split("\n")[0])
    add_verifier_args(p, short_aliases=True)
    g = p.add_argument_group("preference pairs (default: the shipped set)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--pairs", type=Path, help="local JSONL with prompt, chosen, rejected per line")
    src.add_argument("--dataset", help="Hub dataset id, e.g. HuggingFaceH4/ultrafeedback_binarized")
    g.add_argument("--split", default="test_prefs", help="split of --dataset")
    g.add_argument("--limit", type=int, help="audit the first N pairs only")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, help="directory for items.jsonl, results.json, report.md/png")
    g.add_argument("--seed", type=int, default=0, help="rewrite and bootstrap seed")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    g.add_argument("--batch-size", type=int, default=16, help="texts per forward")
    g.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    return p


def load_pairs(args: argparse.Namespace) -> tuple[list[PreferencePair], str]:
    """The pairs the arguments name (at most --limit) and a description of their source."""
    if args.pairs is not None:
        pairs, source = read_pairs_file(args.pairs), str(args.pairs)
    elif args.dataset is not None:
        pairs, source = load_hub_pairs(args.dataset, args.split, args.limit), f"{args.dataset} ({args.split})"
    else:
        pairs, source = shipped_pairs(), SHIPPED_SOURCE
    pairs = pairs[: args.limit]
    if len(pairs) < 2:
        raise CmeError(f"{source} gives {len(pairs)} usable pair(s); the audit needs at least 2")
    return pairs, source


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    for flag in ("bootstrap", "batch_size"):
        if getattr(args, flag) < 1:
            raise CmeError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.limit is not None and args.limit < 2:
        raise CmeError(f"--limit must be >= 2 (the audit compares pairs with each other), got {args.limit}")
    if args.out.exists() and not args.out.is_dir():
        raise CmeError(f"--out {args.out} is a file; give a directory")
    rcfg = verifier_reward(args)
    pairs, source = load_pairs(args)
    return run_audit(
        list(rcfg.verifiers),
        pairs,
        args.out,
        zscore=rcfg.zscore,
        seed=args.seed,
        n_boot=args.bootstrap,
        batch_size=args.batch_size,
        source=source,
        progress=not args.no_progress,
    )


if __name__ == "__main__":
    main()
