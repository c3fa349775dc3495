"""Run logging: TensorBoard scalars, metrics.jsonl, sample tables and a console progress line (process 0 only)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """Where and how often a run reports."""

    tensorboard: bool = True
    console: bool = True
    samples_every: int = 10  # steps between sample tables (0 disables)
    samples_shown: int = 4  # rows per sample table
    preview_tokens: int = 48  # greedy tokens of the before/after preview printed at the end of a run (0 = none)

    def __post_init__(self):
        if self.samples_every < 0 or self.samples_shown < 0 or self.preview_tokens < 0:
            raise ValueError("logging.samples_every, logging.samples_shown and logging.preview_tokens must be >= 0")


def to_float(v: Any) -> float:
    return float(np.asarray(v))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens (1.0 = no repetition)."""
    total, seen = 0, set()
    for t in texts:
        words = t.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def repetition_rate(text: str, n: int = 4) -> float:
    """Share of a text's whitespace n-grams that repeat an earlier one (0 with fewer than n words)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def _append(path: Path):
    """Open a JSONL file for appending; a last line cut short by a killed write is ended first, not joined."""
    f = open(path, "a+")  # noqa: SIM115 - kept open for the run's lifetime; RunLogger.close releases it
    if f.tell() > 0:
        f.seek(f.tell() - 1)
        if f.read(1) != "\n":
            f.write("\n")
    return f


class RunLogger:
    """Writes scalars to TensorBoard and metrics.jsonl, sample tables, and a one-line console progress report."""

    def __init__(
        self, run_dir: str | Path, cfg: LoggingConfig, total_steps: int, start_step: int = 0, active: bool = True
    ):
        self.cfg = cfg
        self.active = active
        self.run_dir = Path(run_dir)
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self._writer = None
        self._jsonl = None
        self._samples = None
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        # Kept open for the run's lifetime and flushed per write; close() releases them.
        self._jsonl = _append(self.run_dir / "metrics.jsonl")
        self._samples = _append(self.run_dir / "samples.jsonl")

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Record one step's scalars (non-finite values are written as null in JSON)."""
        values = {k: to_float(v) for k, v in metrics.items()}
        if not self.active:
            return values
        if self._writer is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._writer.add_scalar(k, v, step)
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        return values

    def record(self, name: str, step: int, scalars: Mapping[str, float], row: Mapping[str, Any]) -> None:
        """Scalars to TensorBoard at `step` and a whole row appended to RUN_DIR/<name> (e.g. heldout.jsonl)."""
        if not self.active:
            return
        if self._writer is not None:
            for k, v in scalars.items():
                if math.isfinite(float(v)):
                    self._writer.add_scalar(k, float(v), step)
            self._writer.flush()
        with _append(self.run_dir / name) as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """A table of prompts, responses and their rewards (TensorBoard text + samples.jsonl)."""
        if not self.active or not rows:
            return
        for r in rows:
            self._samples.write(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n")
        self._samples.flush()
        if self._writer is not None:
            cols = list(rows[0])
            md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in rows:
                cells = [str(r[c]).replace("|", "\\|").replace("\n", "<br>")[:600] for c in cols]
                md.append("| " + " | ".join(cells) + " |")
            self._writer.add_text("samples", "\n".join(md), step)

    def progress(self, step: int, values: Mapping[str, float], keys: Sequence[str]) -> None:
        """`step 12/100 [12%] 3.1 s/step ETA 4m32s | reward -2.31 | ...` on stderr."""
        if not (self.active and self.cfg.console):
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        per = elapsed / max(done, 1)
        eta = per * (self.total - step)
        shown = " | ".join(f"{k.split('/')[-1] if k.count('/') else k} {values[k]:.4g}" for k in keys if k in values)
        pct = 100 * step / max(self.total, 1)
        print(f"step {step}/{self.total} [{pct:3.0f}%] {per:.1f} s/step ETA {_hms(eta)} | {shown}", file=sys.stderr)

    def close(self) -> None:
        for f in (self._jsonl, self._samples):
            if f is not None:
                f.close()
        if self._writer is not None:
            self._writer.close()


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
