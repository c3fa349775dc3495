"""The offline study: does GRPO on the embedded pair make SmolLM2-135M-Instruct better, and what games its reward?

Five arms (arms/*.yaml), same seed, same prompts, same step budget, each trained by the real trainer
(`python -m cme_jax.train --config arms/ARM.yaml`): plain CME under Gemma-3-270M, contrastive CME, plain
CME with guards, self-certainty, and a random-reward control. Each arm's final policy is then evaluated
against the base on held-out prompts it never trained on (the trainer's held-out split of the shipped
prompts plus heldout_prompts.jsonl, written for this study): greedy outputs with a local judge, and sampled
outputs, both with CME in both forms, text statistics, entropy and KL to the base, with bootstrap intervals.

    python studies/offline_pair/run.py                   # run or resume every arm, then write the report
    python studies/offline_pair/run.py --commit          # ... committing each arm's small results as it finishes
    python studies/offline_pair/run.py --report-only     # rebuild results/table.md, curves.png and README.md's table

An arm is done when results/ARM/summary.json exists; a rerun skips it. A half-trained arm resumes from its
last checkpoint in runs/offline_pair/ARM (checkpoints never go into git). Everything the README reports is
read from results/: metrics.jsonl, watchdog.jsonl and samples.jsonl of training, and greedy/ and sampled/
evaluation directories (outputs, judgments, results.json, report.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cme_jax.files import read_run_log
from cme_jax.watchdog import last_row_per_step

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ARMS = ("plain_cme", "contrastive_cme", "guarded_cme", "self_certainty", "random")
LABELS = {
    "plain_cme": "plain CME",
    "contrastive_cme": "contrastive CME",
    "guarded_cme": "plain CME + guards",
    "self_certainty": "self-certainty",
    "random": "random reward",
}
BASE = "smollm2-135m-instruct"
EVAL_TOKENS = 48
README_BEGIN, README_END = "<!-- study-table:begin -->", "<!-- study-table:end -->"


def say(msg: str) -> None:
    print(f"[study] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Configuration of one arm


def arm_config(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """The arm's YAML with the study-level substitutions (run directory, and for smoke runs models and steps)."""
    cfg = yaml.safe_load((HERE / "arms" / f"{arm}.yaml").read_text())
    cfg["run_dir"] = str(args.runs / arm)
    if args.policy:
        cfg["model"]["policy"] = args.policy
    for v in cfg.get("reward", {}).get("verifiers", []):
        if args.verifier_model:
            v["model"] = args.verifier_model
    if args.steps:
        cfg["train"]["steps"] = args.steps
        cfg["train"]["heldout_every"] = min(cfg["train"]["heldout_every"], args.steps)
        cfg["checkpoint"]["every"] = min(cfg["checkpoint"]["every"], args.steps)
    for text in args.set:
        key, _, value = text.partition("=")
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return cfg


def training_verifier(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The plain Gemma verifier every arm logs (the weight-0 monitor where CME is not the reward)."""
    return next(v for v in cfg["reward"]["verifiers"] if not v.get("contrastive"))


# ----------------------------------------------------------------------------------------------------------
# Training through the real trainer


def train_arm(arm: str, cfg: dict[str, Any], out: Path) -> float:
    """Run (or resume) `python -m cme_jax.train` for the arm; returns its wall time. Output goes to out/train.log."""
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "arm.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out.mkdir(parents=True, exist_ok=True)
    say(f"{arm}: training ({cfg['train']['steps']} steps) -> {run_dir}")
    t0 = time.perf_counter()
    with open(out / "train.log", "a") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "cme_jax.train", "--config", str(path)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if proc.returncode != 0:
        tail = (out / "train.log").read_text().strip().splitlines()[-3:]
        raise SystemExit(f"error: training arm {arm} failed (exit {proc.returncode}): {' / '.join(tail)}")
    for name in ("metrics.jsonl", "heldout.jsonl", "samples.jsonl", "watchdog.jsonl", "config.yaml"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, out / name)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# Evaluation against the base


def eval_prompts(cfg: Mapping[str, Any], limit: int | None) -> list[Any]:
    """The trainer's held-out split of its prompt source plus the study's own held-out set (never trained on)."""
    from cme_jax.eval import evaluation as ev

    data = cfg["data"]
    split = ev.load_eval_prompts(data["source"], heldout_fraction=data["heldout_fraction"])
    own = ev.load_eval_prompts(str(HERE / "heldout_prompts.jsonl"))
    prompts = split + own
    return prompts[:limit] if limit else prompts


def evaluate_arm(
    arm: str,
    cfg: Mapping[str, Any],
    out: Path,
    args: argparse.Namespace,
    shared: dict[str, Any],
) -> float:
    """Greedy (judged) and sampled evaluations of the arm's final policy against the base; returns the wall time."""
    from cme_jax.eval import evaluation as ev
    from cme_jax.sampling import SamplingConfig
    from cme_jax.scoring import VerifierConfig

    t0 = time.perf_counter()
    prompts = shared["prompts"]
    v = training_verifier(cfg)
    verifier = VerifierConfig(
        v["model"], name=v["name"], context=v["context"], template=v["template"], max_length=EVAL_TOKENS
    )
    base = ev.load_policy(cfg["model"]["policy"], model=shared["base_model"], name="base")
    model = ev.load_policy(cfg["run_dir"], name=arm)
    modes = (
        ("greedy", SamplingConfig(max_new_tokens=args.eval_tokens, temperature=0.0), shared["judge"]),
        ("sampled", SamplingConfig(max_new_tokens=args.eval_tokens, temperature=1.0), None),
    )
    audit_kw = {"audit": shared["audit"]} if shared["audit"] is not None else {"audit_pairs": args.judge_audit}
    for mode, sampling, judge in modes:
        say(f"{arm}: {mode} evaluation on {len(prompts)} held-out prompts")
        target = out / mode
        cached_base = args.runs / "base_outputs" / mode
        if cached_base.is_dir() and not (target / "baseline").exists():
            shutil.copytree(cached_base, target / "baseline")  # the base's outputs, generated once for all arms
        ev.evaluate(
            model,
            base,
            prompts,
            judge,
            target,
            sampling=sampling,
            verifiers=[verifier],
            seed=0,
            batch_size=16,
            n_boot=2000,
            kl_reference=shared["base_model"],
            score_cache=args.runs / "score_cache.jsonl",
            **({} if judge is None else audit_kw),
        )
        if judge is not None and shared["audit"] is None and args.judge_audit:
            shared["audit"] = json.loads((target / "results.json").read_text()).get("judge_audit")
        if not cached_base.is_dir():
            shutil.copytree(target / "baseline", cached_base)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# Summaries, the table, the figure


def window_mean(rows: Sequence[Mapping[str, Any]], key: str, first: bool, n: int = 10) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    part = vals[:n] if first else vals[-n:]
    return sum(part) / len(part) if part else None


def summarize_arm(arm: str, out: Path, timing: Mapping[str, float]) -> dict[str, Any]:
    """The numbers the README reports for one arm, read back from its committed results."""
    rows = last_row_per_step(read_run_log(out / "metrics.jsonl"))
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    v = training_verifier(cfg)["name"]
    train_keys = {
        "reward": "reward/mean",
        "cme": f"cme/{v}/mean",
        "entropy": "entropy_mean",
        "length": "response/length_mean",
        "truncated": "response/truncated_frac",
        "distinct_2": "response/distinct_2",
        "length_spearman": "reward/length_spearman",
    }
    training = {
        name: {"first10": window_mean(rows, key, True), "last10": window_mean(rows, key, False)}
        for name, key in train_keys.items()
    }
    heldout = [{"step": r["step"], **r["scalars"]} for r in last_row_per_step(read_run_log(out / "heldout.jsonl"))]
    evals = {}
    for mode in ("greedy", "sampled"):
        res = json.loads((out / mode / "results.json").read_text())
        evals[mode] = {
            "automatic": res["automatic"],
            "judge": {k: res.get(k) for k in ("judge", "n", "wins", "ties", "losses", "unparsed")}
            | {k: res.get(k) for k in ("win_rate_tie_adjusted", "ci95_low", "ci95_high", "position_consistency")},
            "judge_audit": res.get("judge_audit"),
        }
    events = read_run_log(out / "watchdog.jsonl")
    return {
        "arm": arm,
        "label": LABELS.get(arm, arm),
        "steps": rows[-1]["step"] if rows else 0,
        "verifier": v,
        "training": training,
        "heldout_curve": heldout,
        "eval": evals,
        "watchdog": [{k: e[k] for k in ("step", "signal", "value", "threshold")} for e in events],
        "timing_s": dict(timing),
    }


def _ci(d: Mapping[str, Any] | None, digits: int = 3, pct: bool = False) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:+.{digits}f}" if digits else f"{x:+.0f}")
    return f"{f(d['mean'])} [{f(d['ci95_low'])}, {f(d['ci95_high'])}]"


def _abs(d: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not d or d.get("mean") is None:
        return "n/a"
    return f"{d['mean']:.{digits}f} [{d['ci95_low']:.{digits}f}, {d['ci95_high']:.{digits}f}]"


def table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """One markdown table: each arm's final policy against the base on the held-out prompts."""
    head = [
        "arm",
        "Δ CME plain, greedy",
        "Δ CME contrastive, greedy",
        "Δ CME plain, sampled",
        "Δ length (tokens), greedy",
        "Δ cut at limit, greedy",
        "Δ distinct-2, sampled",
        "Δ 4-gram rep., sampled",
        "KL to base, sampled",
        "Δ entropy, sampled",
        "judge win rate vs base",
        "watchdog",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_row = None
    for s in summaries:
        v = s["verifier"]
        g, sm = s["eval"]["greedy"]["automatic"]["intervals"], s["eval"]["sampled"]["automatic"]["intervals"]
        j = s["eval"]["greedy"]["judge"]
        win = (
            "n/a"
            if j.get("win_rate_tie_adjusted") is None
            else _ci(
                {"mean": j["win_rate_tie_adjusted"], "ci95_low": j["ci95_low"], "ci95_high": j["ci95_high"]}, pct=True
            )
        )
        fired = ", ".join(f"{e['signal']}@{e['step']}" for e in s["watchdog"]) or "silent"
        diff = lambda iv, k: iv.get(k, {}).get("difference")
        cells = [
            s["label"],
            _ci(diff(g, f"cme_{v}_plain")),
            _ci(diff(g, f"cme_{v}_contrastive")),
            _ci(diff(sm, f"cme_{v}_plain")),
            _ci(diff(g, "length_tokens"), 1),
            _ci(diff(g, "truncated"), pct=True),
            _ci(diff(sm, "distinct_2")),
            _ci(diff(sm, "repetition_4")),
            _abs(sm.get("kl", {}).get("model"), 4),
            _ci(diff(sm, "entropy")),
            win,
            fired,
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if base_row is None:
            base_row = [
                "base (absolute values)",
                _abs(g[f"cme_{v}_plain"]["baseline"]),
                _abs(g[f"cme_{v}_contrastive"]["baseline"]),
                _abs(sm[f"cme_{v}_plain"]["baseline"]),
                _abs(g["length_tokens"]["baseline"], 1),
                _abs(g["truncated"]["baseline"], 2),
                _abs(sm["distinct_2"]["baseline"]),
                _abs(sm["repetition_4"]["baseline"]),
                "0",
                _abs(sm["entropy"]["baseline"]),
                "50%",
                "",
            ]
    if base_row:
        lines.append("| " + " | ".join(base_row) + " |")
    return "\n".join(lines)


def training_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Training-time measures: mean of the first 10 and the last 10 steps."""
    keys = ("reward", "cme", "entropy", "length", "truncated", "distinct_2", "length_spearman")
    head = ["arm", *[f"{k} (first 10 → last 10)" for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x: "n/a" if x is None else f"{x:.3g}"
    for s in summaries:
        t = s["training"]
        lines.append(
            "| " + " | ".join([s["label"], *[f"{fmt(t[k]['first10'])} → {fmt(t[k]['last10'])}" for k in keys]]) + " |"
        )
    return "\n".join(lines)


def curves(summaries: Sequence[Mapping[str, Any]], results: Path, path: Path) -> None:
    """curves.png: training CME, held-out CME, length, distinct-2, KL to the base and entropy per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [
        (
            "training reward: change from the first 10 steps (5-step mean)",
            lambda v: "reward/mean",
            False,
        ),
        ("held-out prompts, greedy: plain CME", lambda v: f"heldout/cme/{v}/mean", True),
        ("training rollouts: response length (tokens)", lambda v: "response/length_mean", False),
        ("training rollouts: distinct-2", lambda v: "response/distinct_2", False),
        ("held-out prompts, greedy: KL to the base (nats/token)", lambda v: "heldout/kl", True),
        ("training rollouts: policy entropy (nats/token)", lambda v: "entropy_mean", False),
    ]
    for ax, (title, key_of, sparse) in zip(axes.ravel(), panels):
        for s in summaries:
            rows = (
                s["heldout_curve"] if sparse else last_row_per_step(read_run_log(results / s["arm"] / "metrics.jsonl"))
            )
            key = key_of(s["verifier"])
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            x, y = map(np.asarray, zip(*pts))
            if key == "reward/mean":  # rewards of different arms live on different scales: show their change
                y = y - y[:10].mean()
            if not sparse and len(y) >= 5:
                y = np.convolve(y, np.ones(5) / 5, mode="valid")
                x = x[4:]
            ax.plot(x, y, marker="o" if sparse else None, label=s["label"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Path, arms: Sequence[str]) -> None:
    """results/table.md, results/curves.png and README.md's table section, from whatever arms are done."""
    summaries = [
        json.loads((results / a / "summary.json").read_text()) for a in arms if (results / a / "summary.json").exists()
    ]
    if not summaries:
        say("no arm has finished yet; nothing to report")
        return
    body = "\n\n".join([table(summaries), "Training (first 10 steps → last 10 steps):", training_table(summaries)])
    (results / "table.md").write_text(body + "\n")
    curves(summaries, results, results / "curves.png")
    readme = HERE / "README.md"
    if readme.exists() and results.resolve() == (HERE / "results").resolve():
        text = readme.read_text()
        if README_BEGIN in text and README_END in text:
            head, rest = text.split(README_BEGIN, 1)
            _, tail = rest.split(README_END, 1)
            readme.write_text(f"{head}{README_BEGIN}\n{body}\n{README_END}{tail}")
    say(f"report: {results / 'table.md'}, {results / 'curves.png'}")


# ----------------------------------------------------------------------------------------------------------
# The run


def commit(paths: Sequence[Path], message: str) -> None:
    subprocess.run(["git", "add", "--", *map(str, paths)], cwd=REPO, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message, "--", *map(str, paths)], cwd=REPO, check=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studies/offline_pair/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms to run (default: all)")
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the small, committed results go")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "offline_pair", help="run directories (checkpoints)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table, the figure and README.md")
    p.add_argument("--commit", action="store_true", help="git-commit each arm's results as soon as it is done")
    p.add_argument("--judge", default=BASE, help="local judge model spec, or 'none' to skip judging")
    p.add_argument("--judge-audit", type=int, default=48, help="shipped preference pairs the judge is audited on")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="new tokens of evaluation outputs")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N held-out prompts only (smoke runs)")
    g = p.add_argument_group("smoke runs (the test suite runs the script on tiny models)")
    g.add_argument("--steps", type=int, help="override every arm's train.steps")
    g.add_argument("--policy", help="override the policy model spec")
    g.add_argument("--verifier-model", help="override every verifier's model spec")
    g.add_argument("--set", action="append", default=[], help="KEY=VALUE override of every arm's config")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(args.results, args.arms)
        return
    todo = [a for a in args.arms if not (args.results / a / "summary.json").exists()]
    say(f"arms done: {[a for a in args.arms if a not in todo]}; to run: {todo}")
    shared: dict[str, Any] = {}
    for arm in todo:
        cfg = arm_config(arm, args)
        out = args.results / arm
        timing = {"train": train_arm(arm, cfg, out)}
        if not shared:
            shared = setup_evaluation(cfg, args)
        timing["evaluate"] = evaluate_arm(arm, cfg, out, args, shared)
        summary = summarize_arm(arm, out, timing)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"{arm}: done in {timing['train'] + timing['evaluate']:.0f} s (train {timing['train']:.0f} s)")
        write_report(args.results, args.arms)
        if args.commit:
            shared_files = [args.results / f for f in ("table.md", "curves.png", "eval_prompts.jsonl", "judge.json")]
            commit([out, *shared_files, HERE / "README.md"], f"Offline study: arm {arm}")
    write_report(args.results, args.arms)


def setup_evaluation(cfg: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What every arm's evaluation shares: prompts, the loaded base model, the judge and its audit size."""
    from cme_jax.eval import judging
    from cme_jax.eval.audit import shipped_pairs
    from cme_jax.sources import load_model

    prompts = eval_prompts(cfg, args.eval_limit)
    with open(args.results / "eval_prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p.instruction}, ensure_ascii=False) + "\n")
    judge, bias = None, None
    if args.judge != "none":
        # Small judges prefer the first answer shown so strongly that they answer A to everything; the bias
        # that removes this is estimated without labels from the audit pairs shown both ways.
        judge_model = load_model(args.judge)
        pairs = shipped_pairs()[: max(args.judge_audit, 8)]
        bias = judging.likelihood_bias(judge_model, pairs)
        say(f"judge {args.judge}: position bias log p(A) - log p(B) = {bias:.4f} (median over {2 * len(pairs)} orders)")
        judge = judging.local_judge(judge_model, verdict="likelihood", batch_size=8, bias=bias)
    (args.results / "judge.json").write_text(
        json.dumps({"judge": args.judge, "verdict": "likelihood", "bias": bias}) + "\n"
    )
    return {"prompts": prompts, "base_model": load_model(cfg["model"]["policy"]), "judge": judge, "audit": None}


if __name__ == "__main__":
    main()
