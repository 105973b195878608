"""Power laws in compute: held-out bits per byte = a * FLOPs ** -alpha, one per configuration.

Fitted by least squares on logarithms (every run a point, seeds included). With n points the 95%
intervals use Student's t with n - 2 degrees of freedom (the scatter around the line, whatever its
cause: seeds, evaluation noise, a curve that is not a power law); with two points there is a line
and no interval. Two configurations' lines cross at one budget; its interval is drawn from the two
fits' parameter distributions.
"""
from __future__ import annotations

import math

import attrs
import numpy as np

# Student's t 0.975 quantiles for 1 .. 30 degrees of freedom (beyond: 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(dof: int) -> float:
    return T975[dof - 1] if dof <= len(T975) else 1.96


@attrs.frozen
class PowerLaw:
    """ln bpb = intercept - alpha ln FLOPs, with the covariance of (intercept, slope = -alpha)."""

    config: str
    intercept: float
    alpha: float
    cov: tuple[tuple[float, float], tuple[float, float]] | None  # None: no interval (two points)
    points: int
    flops_range: tuple[float, float]

    @property
    def dof(self) -> int:
        return self.points - 2

    @property
    def alpha_ci(self) -> tuple[float, float] | None:
        if self.cov is None:
            return None
        half = t975(self.dof) * math.sqrt(self.cov[1][1])
        return self.alpha - half, self.alpha + half

    def predict(self, flops) -> np.ndarray:
        return np.exp(self.intercept - self.alpha * np.log(flops))

    def band(self, flops) -> tuple[np.ndarray, np.ndarray] | None:
        """The 95% confidence band of the fitted line at ``flops``."""
        if self.cov is None:
            return None
        x = np.log(np.asarray(flops, dtype=np.float64))
        c = np.asarray(self.cov)
        se = np.sqrt(c[0, 0] - 2 * x * c[0, 1] + x * x * c[1, 1])  # of intercept - alpha x
        center = self.intercept - self.alpha * x
        return np.exp(center - t975(self.dof) * se), np.exp(center + t975(self.dof) * se)

    def to_dict(self) -> dict:
        return {"config": self.config, "a": math.exp(self.intercept), "alpha": self.alpha,
                "alpha_ci": self.alpha_ci, "points": self.points, "flops_range": list(self.flops_range)}


def fit_power_law(config: str, flops: list[float], bpb: list[float]) -> PowerLaw | None:
    """The least-squares line through (ln FLOPs, ln bpb); None for fewer than two distinct budgets."""
    x, y = np.log(np.asarray(flops, dtype=np.float64)), np.log(np.asarray(bpb, dtype=np.float64))
    if len(set(np.round(x, 9))) < 2:
        return None
    design = np.stack([np.ones_like(x), x], axis=1)
    (b0, b1), *_ = np.linalg.lstsq(design, y, rcond=None)
    cov = None
    if len(x) > 2:
        residual = y - design @ np.array([b0, b1])
        s2 = float(residual @ residual) / (len(x) - 2)
        c = s2 * np.linalg.inv(design.T @ design)
        cov = ((float(c[0, 0]), float(-c[0, 1])), (float(-c[0, 1]), float(c[1, 1])))  # of (intercept, alpha)
    return PowerLaw(config, float(b0), float(-b1), cov, len(x), (float(min(flops)), float(max(flops))))


@attrs.frozen
class Crossover:
    """Where two power laws cross; ``better_below`` wins at smaller budgets, the other above."""

    first: str
    second: str
    flops: float | None  # None: parallel lines
    ci: tuple[float, float] | None
    better_below: str
    within: bool  # inside the budgets both were fitted on

    def to_dict(self) -> dict:
        return attrs.asdict(self)


def crossover(a: PowerLaw, b: PowerLaw, draws: int = 20000, seed: int = 0) -> Crossover:
    """The budget at which ``a`` and ``b`` predict the same bits per byte, with a 95% interval from
    draws of both fits' parameters (Student's t around each fit)."""
    slope = b.alpha - a.alpha  # ln a(C) - ln b(C) = (ia - ib) + (b.alpha - a.alpha) ln C
    lo = max(a.flops_range[0], b.flops_range[0])
    hi = min(a.flops_range[1], b.flops_range[1])
    if abs(slope) < 1e-12:
        better = a.config if a.intercept < b.intercept else b.config
        return Crossover(a.config, b.config, None, None, better, False)
    x = (b.intercept - a.intercept) / slope
    better_below = a.config if slope > 0 else b.config  # the line falling faster starts above
    ci = None
    if a.cov is not None and b.cov is not None:
        rng = np.random.default_rng(seed)

        def draw(fit: PowerLaw) -> np.ndarray:
            """(draws, 2) samples of (intercept, alpha): a multivariate Student's t around the fit."""
            normal = rng.multivariate_normal(np.zeros(2), np.asarray(fit.cov), size=draws)
            scale = np.sqrt(rng.chisquare(fit.dof, size=(draws, 1)) / fit.dof)
            return np.array([fit.intercept, fit.alpha]) + normal / scale

        pa, pb = draw(a), draw(b)
        slopes = pb[:, 1] - pa[:, 1]
        xs = (pb[:, 0] - pa[:, 0]) / np.where(np.abs(slopes) < 1e-12, np.nan, slopes)
        xs = xs[np.isfinite(xs)]
        if len(xs):
            low, high = np.quantile(xs, [0.025, 0.975])
            ci = (float(math.exp(min(low, 700))), float(math.exp(min(high, 700))))
    flops = math.exp(min(x, 700))
    return Crossover(a.config, b.config, flops, ci, better_below, lo <= flops <= hi)
