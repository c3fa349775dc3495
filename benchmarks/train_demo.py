"""Wall time and peak memory of the offline demo: `python -m cme_jax.train --config configs/demo_cpu.yaml`.

    python benchmarks/train_demo.py [--config configs/demo_cpu.yaml] [key=value ...]

Runs the trainer in a child process on a fresh run directory and prints a table: total wall time (start-up,
model loading and compilation included), the first step (which compiles), the mean of the later steps with
their sample / score / update split, and the child's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import table

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_cpu.yaml"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="cme_demo_bench_")) / "run"
    cmd = [sys.executable, "-m", "cme_jax.train", "--config", args.config, f"run_dir={run_dir}", *args.overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"the demo failed:\n{proc.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows

    def mean(key: str) -> float:
        vals = [r[key] for r in later if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    print(f"\ndemo: {args.config} ({len(rows)} steps), run directory {run_dir}\n")
    print(
        table(
            ["total wall", "first step", "later steps (mean)", "sample", "score", "update", "peak RSS"],
            [
                [
                    f"{wall:.0f} s",
                    f"{rows[0]['time/step']:.1f} s",
                    f"{mean('time/step'):.1f} s",
                    f"{mean('time/sample'):.1f} s",
                    f"{mean('time/score'):.1f} s",
                    f"{mean('time/update'):.1f} s",
                    f"{peak / 2**30:.2f} GiB",
                ]
            ],
        )
    )
    print(f"\nreward per step: {[round(r['reward/mean'], 3) for r in rows]}")


if __name__ == "__main__":
    main()
