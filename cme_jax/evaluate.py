"""Head-to-head evaluation of two policies: generate, judge every pair in both orders, score CME, report.

    python -m cme_jax.evaluate --model runs/demo_cpu --baseline smollm2-135m-instruct \
        --prompts builtin:prompts --heldout-fraction 0.05 --max-new-tokens 128 \
        --judge-model smollm2-135m-instruct \
        --verifier gemma3-270m --verifier-context plain --verifier-template "Question: {prompt}\nAnswer:" \
        --out runs/demo_cpu/eval
    JUDGE_KEY=... python -m cme_jax.evaluate --model runs/my_run@400 --baseline Qwen/Qwen2.5-0.5B-Instruct \
        --prompts alpaca_eval --judge-url https://api.openai.com/v1 --judge-name gpt-4o \
        --judge-key-env JUDGE_KEY --out eval/my_run

Policies (`--model`, `--baseline`): any model spec cme_jax loads (Hub id, local directory, .gguf file,
embedded alias); a training run directory, `RUN_DIR` (latest checkpoint) or `RUN_DIR@STEP`, whose policy
weights are restored on top of the model spec and prompt format recorded in the checkpoint; or an
AlpacaEval outputs file (`.json`/`.jsonl` with `instruction` and `output`), e.g. AlpacaEval 2.0's GPT-4
Turbo reference outputs, used as they are.

Prompts (`--prompts`): `alpaca_eval` (AlpacaEval 2.0's 805 instructions, fetched from the Hub dataset
tatsu-lab/alpaca_eval, or read from the local Hugging Face cache), any source `cme_jax.prompts` reads
(`builtin:prompts`, a `.json`/`.jsonl`/`.parquet` file with an `instruction` or `prompt` field, a Hub
dataset). `--heldout-fraction F` keeps only the prompts a training run with `data.heldout_fraction: F`
held out. Generation is greedy unless `--temperature` is set.

Judges: `--judge-model SPEC` runs any model cme_jax loads locally (its chat template, else a plain
transcript), or `--judge-url URL --judge-name MODEL` calls an OpenAI-compatible chat completions endpoint,
with the API key read from the environment variable `--judge-key-env` names (default OPENAI_API_KEY).
Verdicts, the both-orders protocol and the cache are those of `cme_jax.eval.judging`. A local judge's
`--judge-verdict` is `generate` (default: it writes a reply greedily and the verdict is parsed from it) or
`likelihood` (no generation: it is asked for the verdict only, its reply is prefilled with "[[" and the
verdict is whichever of A and B has the higher next-token log-prob; it never leaves a verdict unparsed, and
the reply kept in judgments.jsonl reads `[[A]] (log p A=-0.31, B=-1.42)`). Small local judges often cannot
write a parseable verdict: when more than half of the first 8 pairs stay unparsed, the run stops with one
line instead of spending the whole budget. `--judge-audit N` first scores the judge itself on the first N
of the 48 shipped preference pairs (`cme_jax/data/preference_pairs.jsonl`), both orders, same cache: its
accuracy (how often it prefers the better answer) with a 95% interval, per-order accuracy and position
consistency go into results.json (`judge_audit`) and beside the win rate in report.md, since a win rate
means little from a judge near 50%. `--no-judge` skips judging: generation and the automatic metrics only,
no win rate.

Everything lands in OUT: `model/model_outputs.json` and `baseline/model_outputs.json` (AlpacaEval's
format, so `alpaca_eval --model_outputs OUT/model/model_outputs.json --reference_outputs
OUT/baseline/model_outputs.json` works on them too), `judge_cache.jsonl`, `judgments.jsonl`,
`results.json`, `report.md`, `report.png` and, with `--verifier`, `automatic.jsonl` (per-prompt CME);
`--no-judge` writes no `judgments.jsonl` or `report.png`.
Each side's `generation.json` records what produced its outputs; a rerun reuses outputs whose record
matches (unless `--regenerate`) and every cached judgment, so an interrupted evaluation resumes where it
stopped without generating or paying for a judgment twice. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cme_jax.checkpoint import inspect_run, parse_run_spec
from cme_jax.cli import add_verifier_args, verifier_reward
from cme_jax.errors import CmeError, cli_main
from cme_jax.eval.evaluation import (
    DEFAULT_SAMPLING,
    evaluate,
    is_outputs_file,
    judge_audit_pairs,
    load_eval_prompts,
    load_policy,
)
from cme_jax.eval.judging import VERDICT_MODES, Judge, OpenAIJudge, local_judge
from cme_jax.sampling import SamplingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cme_jax.evaluate", description=__doc__.split("\n")[0])
    g = p.add_argument_group("policies and prompts")
    g.add_argument("--model", required=True, help="model spec, RUN_DIR[@STEP] or an AlpacaEval outputs .json")
    g.add_argument("--baseline", required=True, help="model spec, RUN_DIR[@STEP] or an AlpacaEval outputs .json")
    g.add_argument("--model-name", help="generator name of --model in the outputs and the report")
    g.add_argument("--baseline-name", help="generator name of --baseline")
    g.add_argument("--prompts", required=True, help="alpaca_eval, builtin:NAME, a .json/.jsonl/.parquet file, Hub id")
    g.add_argument("--prompt-field", help="prompt field (default: prompt, instruction or messages)")
    g.add_argument("--split", default="train", help="split of a Hub prompt dataset")
    g.add_argument("--limit", type=int, help="evaluate the first N prompts only")
    g.add_argument("--heldout-fraction", type=float, help="keep only prompts a run with this heldout_fraction held out")
    g.add_argument("--out", required=True, type=Path, help="output directory (outputs, judgments, results, report)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=DEFAULT_SAMPLING.max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--format", choices=["auto", "chat", "plain"], help="prompt format (default: the run's, else auto)")
    g.add_argument("--template", help="plain prompt template with {prompt} (default: the run's, else '{prompt}\\n')")
    g.add_argument("--stop", action="append", help="extra single-token stop string; repeat for several")
    g.add_argument("--truncate-left", action="store_true", help="cut over-long prompts from the left")
    g.add_argument("--regenerate", action="store_true", help="generate again even when OUT holds matching outputs")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation and scoring batch")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="policies and judge")
    g.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    g = p.add_argument_group("judge (exactly one of --judge-model, --judge-url or --no-judge)")
    g.add_argument("--judge-model", help="model spec or RUN_DIR[@STEP] run locally as the judge")
    g.add_argument("--judge-url", help="base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1")
    g.add_argument("--no-judge", action="store_true", help="no judge: generation and automatic metrics only")
    g.add_argument(
        "--judge-verdict",
        help="local judge: generate (write a reply, parse its verdict; default) or likelihood (the likelier of "
        "A and B after '[[', no generation)",
    )
    g.add_argument(
        "--judge-audit",
        type=int,
        default=0,
        metavar="N",
        help="first score the judge on N of the 48 shipped preference pairs (0 = off, default)",
    )
    g.add_argument("--judge-name", help="model name sent to --judge-url")
    g.add_argument("--judge-key-env", help="environment variable holding the API key (default OPENAI_API_KEY)")
    g.add_argument("--judge-no-key", action="store_true", help="send no API key (local servers)")
    g.add_argument("--judge-max-tokens", type=int, help="judge reply length (default: 1024 for URLs, 256 local)")
    g.add_argument("--judge-concurrency", type=int, default=8, help="requests in flight to --judge-url")
    g.add_argument("--judge-retries", type=int, default=5, help="retries per failed request, with backoff")
    g.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--judge-batch-size", type=int, default=8, help="conversations per local judge batch")
    g.add_argument("--retries-unparsed", type=int, default=2, help="follow-ups asking for a missing verdict")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the interval")
    g = p.add_argument_group("automatic metrics")
    g.add_argument(
        "--kl-reference",
        help="model spec (usually the base of --model): the model's entropy and exact KL to it over its outputs",
    )
    g.add_argument(
        "--score-cache", type=Path, help="scored-row cache shared by evaluations (default OUT/score_cache.jsonl)"
    )
    add_verifier_args(p)
    return p


def build_judge(args: argparse.Namespace) -> Judge | None:
    """The judge the arguments name (None for --no-judge); CmeError for none, two, or bad settings, before
    anything loads."""
    if args.no_judge:
        if args.judge_model is not None or args.judge_url is not None:
            raise CmeError("--no-judge and --judge-model/--judge-url exclude each other; give one")
        for flag in ("judge_name", "judge_key_env", "judge_max_tokens", "judge_verdict"):
            if getattr(args, flag) is not None:
                raise CmeError(f"--{flag.replace('_', '-')} needs a judge; drop it or --no-judge")
        if args.judge_no_key or args.judge_audit:
            flag = "--judge-no-key" if args.judge_no_key else "--judge-audit"
            raise CmeError(f"{flag} needs a judge; drop it or --no-judge")
        return None
    if (args.judge_model is None) == (args.judge_url is None):
        raise CmeError(
            "give exactly one judge: --judge-model SPEC (run locally) or --judge-url URL with --judge-name MODEL"
        )
    if args.judge_max_tokens is not None and args.judge_max_tokens < 1:
        raise CmeError(f"--judge-max-tokens must be >= 1, got {args.judge_max_tokens}")
    verdict = args.judge_verdict
    if verdict is not None and verdict not in VERDICT_MODES:
        raise CmeError(f"--judge-verdict must be one of {', '.join(VERDICT_MODES)}, got {verdict!r}")
    judge_audit_pairs(args.judge_audit)  # the range check, before anything loads
    if args.judge_model is not None:
        for flag in ("judge_name", "judge_key_env"):
            if getattr(args, flag) is not None:
                raise CmeError(f"--{flag.replace('_', '-')} goes with --judge-url, not with --judge-model")
        if verdict == "likelihood" and args.judge_max_tokens is not None:
            raise CmeError("--judge-max-tokens goes with --judge-verdict generate; a likelihood verdict writes nothing")
        return local_judge(
            args.judge_model,
            verdict=verdict or "generate",
            max_new_tokens=args.judge_max_tokens or 256,
            batch_size=args.judge_batch_size,
            dtype=args.dtype,
        )
    if verdict == "likelihood":
        raise CmeError(
            "--judge-verdict likelihood needs a local judge (--judge-model): an API returns text, not the log-probs"
        )
    if not args.judge_name:
        raise CmeError("--judge-url needs --judge-name MODEL, the model name the endpoint serves")
    if not args.judge_url.startswith(("http://", "https://")):
        raise CmeError(f"--judge-url {args.judge_url!r} must start with http:// or https://")
    if args.judge_no_key and args.judge_key_env is not None:
        raise CmeError("--judge-no-key and --judge-key-env contradict each other; give one")
    key_env = None if args.judge_no_key else (args.judge_key_env or "OPENAI_API_KEY")
    if key_env is not None and not os.environ.get(key_env, "").strip():
        raise CmeError(
            f"environment variable {key_env} is not set; export the judge's API key there, name another variable "
            "with --judge-key-env, or pass --judge-no-key for a server that needs no key"
        )
    return OpenAIJudge(
        base_url=args.judge_url,
        model=args.judge_name,
        api_key_env=key_env,
        max_concurrency=args.judge_concurrency,
        max_retries=args.judge_retries,
        timeout=args.judge_timeout,
        max_tokens=args.judge_max_tokens or 1024,
    )


def _heldout_hint(spec: str, prompts: str, heldout_fraction: float | None) -> None:
    """Warn when a run is evaluated on the prompt set it trained on without its held-out split."""
    if heldout_fraction is not None or is_outputs_file(spec):
        return
    run_spec = parse_run_spec(spec)
    if run_spec is None:
        return
    data = inspect_run(*run_spec).config.get("data") or {}
    fraction = data.get("heldout_fraction") or 0.0
    if data.get("source") == prompts and fraction > 0:
        print(
            f"note: {spec} trained on {prompts} with heldout_fraction={fraction}; pass --heldout-fraction "
            f"{fraction} to evaluate on the prompts it never saw",
            file=sys.stderr,
        )


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for flag in ("batch_size", "judge_batch_size", "judge_concurrency", "bootstrap"):
        if getattr(args, flag) < 1:
            raise CmeError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.retries_unparsed < 0 or args.judge_retries < 0:
        raise CmeError("--retries-unparsed and --judge-retries must be >= 0")
    if args.out.exists() and not args.out.is_dir():
        raise CmeError(f"--out {args.out} is a file; give a directory")
    try:
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
        )
    except ValueError as e:
        raise CmeError(str(e)) from None
    # CME of both sides under the verifiers, combined as training would (no groups here: one output a prompt).
    verifiers = list(verifier_reward(args, groups=False).verifiers) if args.verifier or args.verifier_config else []
    judge = build_judge(args)
    prompts = load_eval_prompts(
        args.prompts,
        limit=args.limit,
        heldout_fraction=args.heldout_fraction,
        field=args.prompt_field,
        split=args.split,
    )
    overrides = dict(fmt=args.format, template=args.template, stop_strings=args.stop, dtype=args.dtype)
    model = load_policy(args.model, name=args.model_name, **overrides)
    baseline = load_policy(args.baseline, name=args.baseline_name, **overrides)
    _heldout_hint(args.model, args.prompts, args.heldout_fraction)
    print(
        f"evaluating {model.name} against {baseline.name} on {len(prompts)} prompts from {args.prompts}",
        file=sys.stderr,
    )
    evaluate(
        model,
        baseline,
        prompts,
        judge,
        args.out,
        sampling=sampling,
        verifiers=verifiers,
        seed=args.seed,
        batch_size=args.batch_size,
        retries_unparsed=args.retries_unparsed,
        audit_pairs=args.judge_audit,
        n_boot=args.bootstrap,
        regenerate=args.regenerate,
        truncate_left=args.truncate_left,
        prompt_source=args.prompts,
        kl_reference=args.kl_reference,
        score_cache=args.score_cache,
    )


if __name__ == "__main__":
    main()
