"""Confidence intervals over a test sample, shared by the evaluation and the rankers' AUCs."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values: np.ndarray, statistic=np.mean, resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of a statistic over the rows (held-out pairs or
    impressions): how far the figure moves with the test sample alone, not with training seeds."""
    n = len(values)
    if n < 2:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    stats = [statistic(values[rng.integers(0, n, n)]) for _ in range(resamples)]
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]
