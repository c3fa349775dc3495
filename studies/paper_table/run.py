"""The paper's table: four families x pretrained, SFT and instruction-tuned checkpoints, each trained with CME and
judged against its untrained checkpoint on AlpacaEval 2.0.

One command per cell (configs/CELL.yaml; cells are FAMILY-REGIME, e.g. qwen-instruct):

    python studies/paper_table/run.py qwen-instruct --judge-url https://api.openai.com/v1 --judge-name gpt-4o
    python studies/paper_table/run.py --all --judge-url URL --judge-name NAME   # every cell not done yet
    python studies/paper_table/run.py --report-only                             # rebuild the table

A cell trains with `python -m cme_jax.train` on UltraFeedback prompts (8 x 80 GB GPUs: see each config's memory
plan), then `python -m cme_jax.evaluate` generates greedy answers of the trained policy and of the untrained
checkpoint to AlpacaEval 2.0's 805 instructions and has an OpenAI-compatible judge compare every pair in both
orders. The cell's tie-adjusted win rate with its bootstrap interval goes into results/table.md and this
directory's README beside the paper's range (52.5-71.4%). A cell is done when results/CELL/summary.json exists; a
rerun skips it, and a cell whose training stopped resumes from its last checkpoint. Offline smoke runs replace the
models, prompts and judge with flags (--policy, --verifier-model, --train-prompts, --eval-prompts, --judge-model,
--steps, --set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAMILIES = ("qwen", "llama", "gemma", "olmo")
REGIMES = ("pretrained", "sft", "instruct")
CELLS = tuple(f"{f}-{r}" for f in FAMILIES for r in REGIMES)
PAPER_RANGE = (0.525, 0.714)  # tie-adjusted win rates against the untrained base, over all of the paper's cells
README_BEGIN, README_END = "<!-- paper-table:begin -->", "<!-- paper-table:end -->"


def say(msg: str) -> None:
    print(f"[paper_table] {msg}", file=sys.stderr, flush=True)


def cell_config(cell: str, args: argparse.Namespace) -> dict[str, Any]:
    """The cell's YAML with the run directory and any offline substitutions applied."""
    cfg = yaml.safe_load((HERE / "configs" / f"{cell}.yaml").read_text())
    cfg["run_dir"] = str(args.runs / cell)
    if args.policy:
        cfg["model"]["policy"] = args.policy
    if args.verifier_model:
        for v in cfg["reward"]["verifiers"]:
            v["model"] = args.verifier_model
    if args.train_prompts:
        cfg["data"]["source"] = args.train_prompts
    if args.steps:
        cfg["train"]["steps"] = args.steps
        cfg["checkpoint"]["every"] = min(cfg["checkpoint"]["every"], args.steps)
    for text in args.set:
        key, sep, value = text.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {text!r} should look like key.sub=value")
        node: Any = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = yaml.safe_load(value)
        else:
            node[last] = yaml.safe_load(value)
    return cfg


def check_policy(cell: str, cfg: Mapping[str, Any]) -> None:
    """A local checkpoint the cell starts from must exist (the SFT cells of families without a published one)."""
    policy = str(cfg["model"]["policy"])
    if policy.startswith((".", "/", "~")) and not Path(policy).expanduser().exists():
        raise SystemExit(
            f"error: {cell} starts from {policy}, which does not exist; put an SFT checkpoint of that architecture "
            f"there (see configs/{cell}.yaml) or pass --policy SPEC"
        )


def run_logged(cmd: Sequence[str], log: Path, what: str) -> None:
    """Run a command from the repository root with its output appended to `log`; one line when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        proc = subprocess.run(
            list(cmd), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    if proc.returncode != 0:
        tail = " / ".join(log.read_text().strip().splitlines()[-3:])
        raise SystemExit(f"error: {what} failed (exit {proc.returncode}): {tail}")


def train_cell(cell: str, cfg: Mapping[str, Any], out: Path) -> None:
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "cell.yaml"
    path.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    say(f"{cell}: training {cfg['model']['policy']} for {cfg['train']['steps']} steps -> {run_dir}")
    run_logged([sys.executable, "-m", "cme_jax.train", "--config", str(path)], out / "train.log", f"training {cell}")
    (out / "config.yaml").write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    if (run_dir / "metrics.jsonl").exists():
        (out / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())


def evaluate_command(cell: str, cfg: Mapping[str, Any], out: Path, args: argparse.Namespace) -> list[str]:
    """`python -m cme_jax.evaluate`: the trained policy against its untrained checkpoint, both read the same way."""
    model, verifier = cfg["model"], cfg["reward"]["verifiers"][0]
    cmd = [
        *(sys.executable, "-m", "cme_jax.evaluate", "--model", cfg["run_dir"], "--baseline", str(model["policy"])),
        *("--model-name", cell, "--baseline-name", f"{cell}-base", "--prompts", args.eval_prompts),
        *("--out", str(out / "eval"), "--max-new-tokens", str(args.eval_tokens or cfg["sampling"]["max_new_tokens"])),
        *("--format", model.get("prompt_format", "auto"), "--batch-size", str(args.batch_size)),
    ]
    if model.get("template"):
        cmd += ["--template", model["template"]]
    for stop in model.get("stop_strings", []):
        cmd += ["--stop", stop]
    cmd += ["--verifier", verifier["model"], "--verifier-context", verifier.get("context", "auto")]
    if verifier.get("template"):
        cmd += ["--verifier-template", verifier["template"]]
    if args.eval_limit:
        cmd += ["--limit", str(args.eval_limit)]
    if args.judge_url:
        cmd += ["--judge-url", args.judge_url, "--judge-name", args.judge_name, "--judge-key-env", args.judge_key_env]
    else:
        cmd += ["--judge-model", args.judge_model, "--judge-verdict", "likelihood"]
    return cmd


def evaluate_cell(cell: str, cfg: Mapping[str, Any], out: Path, args: argparse.Namespace) -> None:
    say(f"{cell}: evaluating against {cfg['model']['policy']} on {args.eval_prompts}")
    run_logged(evaluate_command(cell, cfg, out, args), out / "evaluate.log", f"evaluating {cell}")


def summarize(cell: str, cfg: Mapping[str, Any], out: Path) -> dict[str, Any]:
    res = json.loads((out / "eval" / "results.json").read_text())
    keys = ("judge", "n", "wins", "ties", "losses", "win_rate_tie_adjusted", "ci95_low", "ci95_high")
    return {
        "cell": cell,
        "policy": cfg["model"]["policy"],
        "verifier": cfg["reward"]["verifiers"][0]["model"],
        "steps": cfg["train"]["steps"],
        **{k: res.get(k) for k in keys},
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def table(results: Path) -> str:
    """Every cell's tie-adjusted win rate against its untrained checkpoint, beside the paper's range."""
    lo, hi = PAPER_RANGE
    head = ["cell", "trained from", "verifier", "judge", "n", "win rate, tie-adjusted [95% CI]", "paper's range"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    paper = f"{_pct(lo)}-{_pct(hi)}"
    for cell in CELLS:
        path = results / cell / "summary.json"
        if not path.exists():
            cfg = yaml.safe_load((HERE / "configs" / f"{cell}.yaml").read_text())
            row = [cell, cfg["model"]["policy"], cfg["reward"]["verifiers"][0]["model"], "", "", "not run", paper]
        else:
            s = json.loads(path.read_text())
            rate = f"{_pct(s['win_rate_tie_adjusted'])} [{_pct(s['ci95_low'])}, {_pct(s['ci95_high'])}]"
            judge = str(s["judge"]).replace("|", "\\|")  # a judge name may hold the table's separator
            row = [cell, s["policy"], s["verifier"], judge, str(s["n"]), rate, paper]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_report(results: Path) -> None:
    body = table(results)
    (results / "table.md").write_text(body + "\n")
    readme = HERE / "README.md"
    if results.resolve() == (HERE / "results").resolve() and readme.exists():
        text = readme.read_text()
        if README_BEGIN in text and README_END in text:
            head, rest = text.split(README_BEGIN, 1)
            readme.write_text(f"{head}{README_BEGIN}\n{body}\n{README_END}{rest.split(README_END, 1)[1]}")
    say(f"table: {results / 'table.md'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="studies/paper_table/run.py", description=__doc__.split("\n")[0])
    p.add_argument("cells", nargs="*", metavar="CELL", help=f"cells to run: {', '.join(CELLS)}")
    p.add_argument("--all", action="store_true", help="run every cell that is not done")
    p.add_argument("--report-only", action="store_true", help="only rebuild results/table.md and the README table")
    p.add_argument("--results", type=Path, default=HERE / "results", help="small per-cell results and the table")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "paper_table", help="run directories (checkpoints)")
    j = p.add_argument_group("judge (an OpenAI-compatible endpoint, or a local model for smoke runs)")
    j.add_argument("--judge-url", help="base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1")
    j.add_argument("--judge-name", help="judge model name sent to --judge-url")
    j.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable with the API key")
    j.add_argument("--judge-model", help="a local judge model spec instead of --judge-url")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-prompts", default="alpaca_eval", help="evaluation prompts (default: AlpacaEval 2.0)")
    e.add_argument("--eval-limit", type=int, help="the first N evaluation prompts only")
    e.add_argument("--eval-tokens", type=int, help="new tokens per answer (default: the cell's max_new_tokens)")
    e.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    s = p.add_argument_group("offline substitutes (smoke runs)")
    s.add_argument("--policy", help="train from this model spec instead of the cell's checkpoint")
    s.add_argument("--verifier-model", help="use this verifier model spec")
    s.add_argument("--train-prompts", help="training prompt source instead of UltraFeedback")
    s.add_argument("--steps", type=int, help="training steps")
    s.add_argument("--set", action="append", default=[], help="KEY=VALUE override of the cell's config")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(args.results)
        return
    if bool(args.judge_url) == bool(args.judge_model):
        raise SystemExit("error: give a judge: --judge-url URL --judge-name NAME, or --judge-model SPEC")
    if args.judge_url and not args.judge_name:
        raise SystemExit("error: --judge-url needs --judge-name (the model the endpoint serves)")
    cells = list(CELLS) if args.all else list(args.cells)
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        raise SystemExit(f"error: {unknown[0]!r} is not a cell; cells are {', '.join(CELLS)}")
    if not cells:
        raise SystemExit(f"error: name the cells to run ({', '.join(CELLS)}) or pass --all")
    todo = [c for c in cells if not (args.results / c / "summary.json").exists()]
    say(f"done: {[c for c in cells if c not in todo]}; to run: {todo}")
    for cell in todo:
        cfg = cell_config(cell, args)
        check_policy(cell, cfg)
        out = args.results / cell
        train_cell(cell, cfg, out)
        evaluate_cell(cell, cfg, out, args)
        summary = summarize(cell, cfg, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(
            f"{cell}: win rate {_pct(summary['win_rate_tie_adjusted'])} (paper's range {_pct(PAPER_RANGE[0])}-"
            f"{_pct(PAPER_RANGE[1])})"
        )
        write_report(args.results)


if __name__ == "__main__":
    main()
