"""Statistics of the evaluation tools: bootstrap intervals, rank correlations, win rates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

LEVEL = 0.95


def bootstrap_ci(
    scores: Sequence[float], *, seed: int = 0, n_boot: int = 2000, level: float = 0.95
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean score, resampling prompts; None when there are none."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def win_rate(
    first: Sequence[float] | np.ndarray,
    second: Sequence[float] | np.ndarray,
    *,
    seed: int = 0,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Share of items where first beats second (ties half) with a 95% percentile bootstrap interval over items."""
    o = outcomes(first, second)
    ci = bootstrap_ci(o, seed=seed, n_boot=n_boot, level=LEVEL)
    return {
        "rate": float(o.mean()) if o.size else None,
        "ci95_low": ci[0] if ci else None,
        "ci95_high": ci[1] if ci else None,
        "n": int(o.size),
        "wins": int((o == 1.0).sum()),
        "ties": int((o == 0.5).sum()),
        "losses": int((o == 0.0).sum()),
    }


def average_ranks(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, tied values sharing the mean of their ranks."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.arange(1, x.size + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Spearman's rank correlation (Pearson correlation of average ranks); None when either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.size != ry.size:
        raise ValueError(f"spearman needs equal lengths, got {rx.size} and {ry.size}")
    if rx.size < 2:
        return None
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((dx * dx).sum() * (dy * dy).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else None


def interval(x: np.ndarray, *, seed: int = 0, n_boot: int = 2000) -> dict[str, float | int | None]:
    """Mean of the finite values with a percentile-bootstrap 95% interval over them."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    ci = bootstrap_ci(x, seed=seed, n_boot=n_boot)
    return {
        "mean": float(x.mean()) if x.size else None,
        "ci95_low": ci[0] if ci else None,
        "ci95_high": ci[1] if ci else None,
        "n": int(x.size),
    }


def paired_interval(model_x: np.ndarray, base_x: np.ndarray, *, seed: int = 0, n_boot: int = 2000) -> dict[str, Any]:
    """Both sides' means and their per-prompt difference (model - baseline), each with a bootstrap 95% interval.

    Only prompts where both values are known count; one seed means every interval resamples the same prompts.
    """
    model_x, base_x = np.asarray(model_x, np.float64), np.asarray(base_x, np.float64)
    both = np.isfinite(model_x) & np.isfinite(base_x)
    m, b = model_x[both], base_x[both]
    kw = dict(seed=seed, n_boot=n_boot)
    return {"model": interval(m, **kw), "baseline": interval(b, **kw), "difference": interval(m - b, **kw)}


def pct(x: float | None, digits: int = 1) -> str:
    """A rate as a percentage, or n/a."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def outcomes(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per item 1 where first scores above second, 0.5 on a tie, 0 below."""
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    return (a > b) + 0.5 * (a == b)
