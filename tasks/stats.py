"""Statistics over seeds: mean ± std per variant and the paired difference to a baseline.

Pure functions (numpy, scipy); ``None`` wherever a number does not exist (one value has
no sample std, fewer than two paired seeds have no interval).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import t as student_t

BASELINE = "K=1"
METRIC_PREFIXES = ("recall@", "nmi", "map@r", "r_precision")


def is_metric(key: str) -> bool:
    return key.startswith(METRIC_PREFIXES)


def describe(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (ddof=1; None for fewer than 2 values) and n."""
    array = np.asarray(values, dtype=np.float64)
    n = len(array)
    return {
        "mean": float(array.mean()) if n else None,
        "std": float(array.std(ddof=1)) if n >= 2 else None,
        "n": n,
    }


def t_interval(mean: float, sd: float, n: int) -> tuple[float, float] | None:
    """95 % t-interval of a mean: mean ± t(0.975, n-1)·sd/√n; None for n < 2."""
    if n < 2:
        return None
    half = float(student_t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
    return mean - half, mean + half


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict[str, Any]:
    """``values − baseline`` over the seeds both have: diff (mean), std, ci_low, ci_high, n."""
    seeds = sorted(set(values) & set(baseline))
    stats = describe([values[s] - baseline[s] for s in seeds])
    interval = t_interval(stats["mean"], stats["std"], stats["n"]) if stats["std"] is not None else None
    return {
        "diff": stats["mean"],
        "std": stats["std"],
        "ci_low": interval[0] if interval else None,
        "ci_high": interval[1] if interval else None,
        "n": stats["n"],
    }


def summarize(groups: Mapping[str, Mapping[int, Mapping[str, float]]], baseline: str = BASELINE) -> dict[str, Any]:
    """``groups``: variant → seed → metrics. Returns ``{"summary": {variant: {metric:
    describe}}, "vs_K1": {variant: {metric: paired_difference}}}``; ``vs_K1`` is empty
    without baseline runs and never holds the baseline itself."""
    summary: dict[str, dict[str, Any]] = {}
    versus: dict[str, dict[str, Any]] = {}
    for variant, by_seed in groups.items():
        metrics = _metric_names(by_seed)
        summary[variant] = {m: describe([r[m] for r in by_seed.values() if m in r]) for m in metrics}
        if variant != baseline and baseline in groups:
            reference = groups[baseline]
            versus[variant] = {
                m: paired_difference(_column(by_seed, m), _column(reference, m))
                for m in metrics
                if m in _metric_names(reference)
            }
    return {"summary": summary, "vs_K1": versus}


def _metric_names(by_seed: Mapping[int, Mapping[str, float]]) -> list[str]:
    names = {k for row in by_seed.values() for k in row if is_metric(k)}
    return sorted(names, key=metric_order)


def metric_order(key: str) -> tuple[bool, int, str]:
    """recall@k by k first, then the other metrics by name."""
    recall = key.startswith("recall@")
    return (not recall, int(key[7:]) if recall and key[7:].isdigit() else 0, key)


def _column(by_seed: Mapping[int, Mapping[str, float]], metric: str) -> dict[int, float]:
    return {seed: float(row[metric]) for seed, row in by_seed.items() if metric in row}
