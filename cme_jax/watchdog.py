"""Reward-hacking watchdog: signals of length, repetition and truncation gaming from the trainer's step metrics.

Likelihood rewards can be raised without better answers: longer or shorter responses, repeated n-grams, text
cut at the generation limit, a policy running away from its reference. Every step the trainer feeds the
step's metrics to a `Watchdog`, logs the `watch/<signal>` scalars it returns (only those computable so far)
and prints one warning line per signal that crossed its threshold, also appended to RUN_DIR/watchdog.jsonl.

Windows (W = `watch.window`, steps counted from the run's first step): baseline = the mean over the run's
first W steps, recent = the mean over the last W steps, trailing = recent. Trend signals need at least 2W
steps, so baseline and recent never overlap. Metric values that are missing or non-finite are left out of a
window's mean. Signals and their thresholds (`WatchConfig` fields of the same names):

    distinct2_drop   >= 0.05  baseline - recent `response/distinct_2`, while the reward rose (recent
                              `reward/mean` above its baseline; else 0)                       (2W steps)
    repetition_rise  >= 0.05  recent - baseline `response/repetition_<n>` (n-gram repetition, n =
                              reward.repetition_ngram, 4 by default), under the same condition  (2W steps)
    length_corr      >= 0.5   trailing mean of `reward/length_spearman`, the mean within-group Spearman
                              correlation of reward and response length                        (W steps)
    truncation_rise  >= 0.2   recent - baseline `response/truncated_frac`                      (2W steps)
    kl_growth        >= 2.0   mean `kl_mean` of the last W steps / that of the W steps before, when the
                              earlier mean is > 0; fires only while the recent mean is also above
                              kl_floor (0.02); needs kl_mean (grpo.beta > 0)                   (2W steps)
    empty_frac       >= 0.1   trailing mean of `response/empty_frac`                           (W steps)
    length_shrink    >= 0.3   1 - recent / baseline `response/length_mean` (baseline > 0)      (2W steps)

A signal fires when it goes from below its threshold (or not yet computable) to at or above it, and can fire
again only after going back below. `replay(rows, cfg)` runs the same `Watchdog` over a list of metrics rows
(e.g. a run's metrics.jsonl), so a resumed run, which rebuilds its history from that file, reports exactly
what an uninterrupted run does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cme_jax.files import read_run_log

WATCHDOG_FILE = "watchdog.jsonl"
# Short names of the watched metrics -> the trainer's metric keys.
WATCHED = {
    "reward": "reward/mean",
    "distinct2": "response/distinct_2",
    "length_spearman": "reward/length_spearman",
    "truncated": "response/truncated_frac",
    "kl": "kl_mean",
    "empty": "response/empty_frac",
    "length": "response/length_mean",
}
REPETITION_PREFIX = "response/repetition_"  # the n of reward.repetition_ngram follows
# Signals whose values are fractions or correlations, so their thresholds lie in (0, 1].
FRACTION_SIGNALS = (
    "distinct2_drop",
    "repetition_rise",
    "length_corr",
    "truncation_rise",
    "empty_frac",
    "length_shrink",
)


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    """Reward-hacking watchdog: window length and the threshold of each signal (see cme_jax/watchdog.py)."""

    enabled: bool = True
    window: int = 10  # W steps: baseline = the first W steps, recent = the last W
    distinct2_drop: float = 0.05
    repetition_rise: float = 0.05
    length_corr: float = 0.5
    truncation_rise: float = 0.2
    kl_growth: float = 2.0
    kl_floor: float = 0.02  # kl_growth fires only while the recent mean KL is above this
    empty_frac: float = 0.1
    length_shrink: float = 0.3

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"watch.window={self.window!r} must be an integer >= 1")
        for name in FRACTION_SIGNALS:
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"watch.{name}={getattr(self, name)!r} must be in (0, 1]")
        if not (self.kl_growth > 1 and math.isfinite(self.kl_growth)):
            raise ValueError(f"watch.kl_growth={self.kl_growth!r} must be a finite ratio > 1")
        if not (self.kl_floor >= 0 and math.isfinite(self.kl_floor)):
            raise ValueError(f"watch.kl_floor={self.kl_floor!r} must be a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class Event:
    """One firing: the signal crossed its threshold at this step."""

    step: int
    signal: str
    value: float
    threshold: float
    message: str  # the warning line, without its "warning: " prefix

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class _Reading:
    value: float
    hot: bool  # at or above the threshold (and any extra condition)
    detail: str  # the numbers behind the value, for the warning line


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _extract(step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The watched values of one step (None where missing or non-finite), under their short names."""
    row: dict[str, Any] = {"step": step, **{name: _finite(metrics.get(key)) for name, key in WATCHED.items()}}
    rep = sorted(k for k in metrics if k.startswith(REPETITION_PREFIX))
    row["repetition"] = _finite(metrics[rep[0]]) if rep else None
    return row


@dataclasses.dataclass(frozen=True)
class _View:
    """The history seen through the windows at its latest step."""

    rows: Sequence[Mapping[str, Any]]
    w: int

    @staticmethod
    def _mean(rows: Sequence[Mapping[str, Any]], name: str) -> float | None:
        vals = [r[name] for r in rows if r[name] is not None]
        return sum(vals) / len(vals) if vals else None

    @staticmethod
    def span(rows: Sequence[Mapping[str, Any]]) -> str:
        return f"{rows[0]['step']}-{rows[-1]['step']}"

    @property
    def base(self) -> Sequence[Mapping[str, Any]]:
        return self.rows[: self.w]

    @property
    def recent(self) -> Sequence[Mapping[str, Any]]:
        return self.rows[-self.w :]

    @property
    def before(self) -> Sequence[Mapping[str, Any]]:
        return self.rows[-2 * self.w : -self.w]

    def trailing(self, name: str) -> float | None:
        """Mean over the last W steps, once there are W."""
        return self._mean(self.recent, name) if len(self.rows) >= self.w else None

    def trend(self, name: str, earlier: str = "base") -> tuple[float, float] | None:
        """(earlier, recent) means once there are 2W steps; earlier is the baseline or the W steps `before`."""
        if len(self.rows) < 2 * self.w:
            return None
        a, b = self._mean(getattr(self, earlier), name), self._mean(self.recent, name)
        return None if a is None or b is None else (a, b)

    def change(self, name: str, label: str) -> str:
        t = self.trend(name)
        return f"{label} {t[0]:.3g} over steps {self.span(self.base)} -> {t[1]:.3g} over steps {self.span(self.recent)}"


def _while_reward_rose(v: _View, name: str, label: str, sign: float, threshold: float) -> _Reading | None:
    t, r = v.trend(name), v.trend("reward")
    if t is None or r is None:
        return None
    value = sign * (t[1] - t[0]) if r[1] > r[0] else 0.0
    detail = f"{v.change(name, label)} while the mean reward went {r[0]:.3g} -> {r[1]:.3g}"
    return _Reading(value, value >= threshold, detail)


def _distinct2_drop(v: _View, cfg: WatchConfig) -> _Reading | None:
    return _while_reward_rose(v, "distinct2", "distinct-2", -1.0, cfg.distinct2_drop)


def _repetition_rise(v: _View, cfg: WatchConfig) -> _Reading | None:
    return _while_reward_rose(v, "repetition", "n-gram repetition", 1.0, cfg.repetition_rise)


def _trailing(name: str, field: str, label: str) -> Callable[[_View, WatchConfig], _Reading | None]:
    def signal(v: _View, cfg: WatchConfig) -> _Reading | None:
        value = v.trailing(name)
        if value is None:
            return None
        return _Reading(value, value >= getattr(cfg, field), f"{label} over steps {v.span(v.recent)}")

    return signal


def _truncation_rise(v: _View, cfg: WatchConfig) -> _Reading | None:
    t = v.trend("truncated")
    if t is None:
        return None
    value = t[1] - t[0]
    return _Reading(value, value >= cfg.truncation_rise, v.change("truncated", "truncated fraction"))


def _kl_growth(v: _View, cfg: WatchConfig) -> _Reading | None:
    t = v.trend("kl", earlier="before")
    if t is None or t[0] <= 0:
        return None
    value = t[1] / t[0]
    detail = (
        f"mean KL to the reference {t[0]:.3g} over steps {v.span(v.before)} -> {t[1]:.3g} over steps "
        f"{v.span(v.recent)}, floor {cfg.kl_floor:g}"
    )
    return _Reading(value, value >= cfg.kl_growth and t[1] > cfg.kl_floor, detail)


def _length_shrink(v: _View, cfg: WatchConfig) -> _Reading | None:
    t = v.trend("length")
    if t is None or t[0] <= 0:
        return None
    value = 1.0 - t[1] / t[0]
    return _Reading(value, value >= cfg.length_shrink, v.change("length", "mean response length"))


# Each signal: how to read it from the history, and what a firing suggests. The order is the order of the
# scalars and of the events of one step.
SIGNALS: dict[str, tuple[Callable[[_View, WatchConfig], _Reading | None], str]] = {
    "distinct2_drop": (_distinct2_drop, "the policy may be trading diversity for reward"),
    "repetition_rise": (_repetition_rise, "the policy may be repeating itself for reward"),
    "length_corr": (
        _trailing("length_spearman", "length_corr", "mean within-group rank correlation of reward and response length"),
        "the policy may be exploiting length",
    ),
    "truncation_rise": (_truncation_rise, "responses are running into the generation limit"),
    "kl_growth": (_kl_growth, "the policy is leaving the reference faster and faster"),
    "empty_frac": (
        _trailing("empty", "empty_frac", "mean fraction of empty responses"),
        "the policy may be collapsing to empty responses",
    ),
    "length_shrink": (_length_shrink, "the policy may be exploiting short responses (short prefixes score high)"),
}


class Watchdog:
    """Feeds on one step's metrics at a time; returns the `watch/*` scalars and the signals that fired."""

    def __init__(self, cfg: WatchConfig):
        self.cfg = cfg
        self.rows: list[dict[str, Any]] = []
        self._hot: set[str] = set()

    def observe(self, step: int, metrics: Mapping[str, Any]) -> tuple[dict[str, float], list[Event]]:
        """Add step `step` (after every earlier one) and read every signal."""
        if self.rows and step <= self.rows[-1]["step"]:
            raise ValueError(f"watchdog: step {step} does not follow step {self.rows[-1]['step']}")
        self.rows.append(_extract(step, metrics))
        view = _View(self.rows, self.cfg.window)
        scalars: dict[str, float] = {}
        events: list[Event] = []
        for name, (read, hint) in SIGNALS.items():
            reading = read(view, self.cfg)
            hot = reading is not None and reading.hot
            if reading is not None:
                scalars[f"watch/{name}"] = reading.value
            if hot and name not in self._hot:
                threshold = getattr(self.cfg, name)
                message = (
                    f"watchdog: {name}={reading.value:.3g} >= {threshold:g} at step {step} ({reading.detail}): {hint}"
                )
                events.append(Event(step, name, reading.value, threshold, message))
            (self._hot.add if hot else self._hot.discard)(name)
        return scalars, events

    def feed(self, rows: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, float]], list[Event]]:
        """Observe metrics rows (each with its "step"; the last row of a step wins), in step order."""
        scalars, events = [], []
        for row in last_row_per_step(rows):
            s, e = self.observe(int(row["step"]), row)
            scalars.append({"step": int(row["step"]), **s})
            events.extend(e)
        return scalars, events


def replay(rows: Iterable[Mapping[str, Any]], cfg: WatchConfig) -> tuple[list[dict[str, float]], list[Event]]:
    """Per-step `watch/*` scalars (each with its "step") and the events of a whole trace of metrics rows."""
    return Watchdog(cfg).feed(rows)


def last_row_per_step(rows: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One row per step, in step order; a re-run step (after a resume) replaces the row logged before."""
    last = {int(r["step"]): r for r in rows}
    return [last[s] for s in sorted(last)]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.jsonl ([] without one); a line cut short by a killed write is skipped."""
    return read_run_log(Path(run_dir) / "metrics.jsonl")


def write_events(path: str | Path, events: Sequence[Event], append: bool = True) -> None:
    """Append (or, with append=False, rewrite) watchdog.jsonl rows {step, signal, value, threshold, message}."""
    with open(path, "a" if append else "w") as f:
        f.writelines(e.to_json() + "\n" for e in events)


def verdict(events: Sequence[Event], steps: int) -> str:
    """The one-line summary a run ends with."""
    if not events:
        return f"watchdog: no signal fired in {steps} steps"
    fired = ", ".join(f"{e.signal} at step {e.step}" for e in events)
    return f"watchdog: fired {fired} in {steps} steps (see {WATCHDOG_FILE})"
