"""Command-line pieces shared by `score`, `audit` and `evaluate`: one set of verifier flags and one reader of
verifier settings, so every command reads a verifier, its weight and the reward the way training does."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from cme_jax.errors import CmeError
from cme_jax.files import read_yaml_mapping
from cme_jax.rewards import RewardConfig, cme_config
from cme_jax.scoring import ContextFormat, VerifierConfig, VerifierDtype
from cme_jax.tokens import DEFAULT_PLAIN_TEMPLATE

# (flag, short alias kept by score and audit, argparse keywords)
VERIFIER_FLAGS: tuple[tuple[str, str | None, dict[str, Any]], ...] = (
    ("--verifier", None, dict(action="append", default=[], help="verifier model spec; repeat for several")),
    (
        "--verifier-config",
        "--config",
        dict(type=Path, help="training config or YAML with reward.verifiers (weights, zscore, empty_reward)"),
    ),
    (
        "--verifier-context",
        "--context",
        dict(choices=["auto", "chat", "plain"], default="auto", help="for --verifier models (auto: chat if any)"),
    ),
    (
        "--verifier-template",
        "--template",
        dict(default=DEFAULT_PLAIN_TEMPLATE, help="plain context with {prompt}, for --verifier models"),
    ),
    ("--verifier-dtype", "--dtype", dict(choices=["auto", "float32", "bfloat16"], default="auto")),
    ("--verifier-max-length", "--max-length", dict(type=int, default=1024, help="response tokens scored at most")),
    (
        "--verifier-score-eos",
        "--score-eos",
        dict(action="store_true", help="also score the end token of responses that stopped"),
    ),
    (
        "--verifier-contrastive",
        "--contrastive",
        dict(action="store_true", help="subtract each response's mean log-prob after an empty prompt"),
    ),
)


def add_verifier_args(parser: argparse.ArgumentParser, *, short_aliases: bool = False) -> None:
    """The verifier flags, in their own group (`short_aliases`: also --context, --template, ... for score/audit)."""
    g = parser.add_argument_group("verifiers")
    for flag, alias, kw in VERIFIER_FLAGS:
        names = [flag, alias] if short_aliases and alias else [flag]
        g.add_argument(*names, dest=flag[2:].replace("-", "_"), **kw)


def read_reward_file(path: Path) -> RewardConfig:
    """The reward settings of a YAML file: a training config's `reward:` section, or those keys at the top level."""
    data = read_yaml_mapping(path)
    section = data.get("reward") if "reward" in data else data
    if not isinstance(section, dict) or not section.get("verifiers"):
        raise CmeError(f"{path} has no reward.verifiers (or top-level verifiers); list at least one verifier")
    fields = [f.name for f in dataclasses.fields(RewardConfig)]
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise CmeError(f"{path}: unknown key {unknown[0]!r} in the reward settings; allowed: {', '.join(fields)}")
    try:
        return RewardConfig(**section)
    except (TypeError, ValueError) as e:
        raise CmeError(f"{path}: {e}") from None


def verifier_reward(args: argparse.Namespace, *, groups: bool = True) -> RewardConfig:
    """The verifiers of --verifier-config, then one per --verifier with the command-line settings, as the `cme`
    reward they make: each verifier's weight times the file's cme term weight, its zscore and empty_reward.

    Without `groups` (rows that are single responses) a zscore from the file cannot apply and is dropped.
    """
    base = read_reward_file(args.verifier_config) if args.verifier_config else None
    configs: list[VerifierConfig] = []
    kw: dict[str, Any] = {}
    if base is not None:
        cme_w = next((t.weight for t in base.terms if t.name == "cme"), 1.0)
        configs = [dataclasses.replace(v, weight=cme_w * v.weight) for v in base.verifiers]
        kw = dict(zscore=base.zscore and groups, zscore_eps=base.zscore_eps, empty_reward=base.empty_reward)
        if base.zscore and not groups:
            print(
                f"note: {args.verifier_config}: reward.zscore needs groups of responses; not applied", file=sys.stderr
            )
    context: ContextFormat = args.verifier_context
    dtype: VerifierDtype = args.verifier_dtype
    try:
        for spec in args.verifier:
            configs.append(
                VerifierConfig(
                    model=spec,
                    context=context,
                    template=args.verifier_template,
                    dtype=dtype,
                    max_length=args.verifier_max_length,
                    score_eos=args.verifier_score_eos,
                    contrastive=args.verifier_contrastive,
                )
            )
    except ValueError as e:
        raise CmeError(str(e)) from None
    if not configs:
        raise CmeError("no verifier given; pass --verifier SPEC or a --verifier-config file with reward.verifiers")
    names = [c.name for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CmeError(f"two verifiers are named {dup[0]!r}; give each model once or distinct names in the config")
    return cme_config(configs, **kw)
