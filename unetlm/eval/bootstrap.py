"""Percentile bootstrap confidence intervals for a mean or a ratio of sums, and for the difference
of two ratios measured on the same units (paired), seeded."""
from __future__ import annotations

import numpy as np


def ratio(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """sum(values) / sum(weights); the mean when ``weights`` is None."""
    values = np.asarray(values, dtype=np.float64)
    if weights is None:
        return float(values.mean())
    return float(values.sum() / np.asarray(weights, dtype=np.float64).sum())


def bootstrap_ci(
    values, weights=None, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """(low, high): the ``level`` percentile interval of :func:`ratio` over resampled units.

    Units (items, or windows of bytes with their byte counts as ``weights``) are drawn with
    replacement, ``len(values)`` per resample; the same seed gives the same interval.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap of an empty sample")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1 (got {level}, {resamples})")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    if weights is None:
        stats = values[idx].mean(axis=1)
    else:
        w = np.asarray(weights, dtype=np.float64)
        stats = values[idx].sum(axis=1) / w[idx].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap_ci(
    values_a, weights_a, values_b, weights_b, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(difference, low, high): ``ratio(a) - ratio(b)`` and its ``level`` percentile interval, drawing
    the same units for both (two models scored on the same blocks of text, so what the text makes
    easy or hard for both cancels)."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (values_a, weights_a, values_b, weights_b)]
    n = len(arrays[0])
    if n == 0 or any(len(x) != n for x in arrays):
        raise ValueError(f"a paired bootstrap needs equally many units on both sides (got {[len(x) for x in arrays]})")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"need 0 < level < 1 and resamples >= 1 (got {level}, {resamples})")
    va, wa, vb, wb = arrays
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    stats = va[idx].sum(axis=1) / wa[idx].sum(axis=1) - vb[idx].sum(axis=1) / wb[idx].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return ratio(va, wa) - ratio(vb, wb), float(low), float(high)
