"""Paired bootstrap intervals for per-token averages over validation rows (and seeds).

A run's validation CE (or KL) is a ratio, Σ_rows loss / Σ_rows tokens. Two runs scored on the same rows are
compared by the difference of their ratios; its interval comes from resampling the rows — the same rows
for both runs, which is what makes it paired — and, when each arm has several seeds, the seeds first and
then the rows. Deterministic: the resampling generator is seeded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAPS = 2000


@dataclass(frozen=True)
class Interval:
    delta: float  # the difference of the point estimates, b − a
    low: float
    high: float
    rows: int
    seeds: int

    def text(self, what: str = "Δ") -> str:
        over = f"{self.rows} rows" + (f" × {self.seeds} seeds" if self.seeds > 1 else "")
        return f"{what} = {self.delta:+.4f} [95% paired bootstrap over {over}: {self.low:+.4f}, {self.high:+.4f}]"


def paired_difference(a: np.ndarray, b: np.ndarray, n_boot: int = BOOTSTRAPS, seed: int = 0) -> Interval:
    """``a``, ``b``: [seeds, rows, 2] arrays of (loss sum, token count) per row, the same rows in the same
    order (seeds paired by position). The difference of the pooled ratios, b − a, with a 95% percentile
    interval from resampling seeds, then rows, with replacement."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 2:
        a, b = a[None], b[None]
    if a.shape != b.shape or a.shape[-1] != 2 or a.shape[1] == 0:
        raise ValueError(f"paired rows of (sum, count): got {a.shape} and {b.shape}")
    seeds, rows = a.shape[:2]

    def ratio(x: np.ndarray) -> np.ndarray:
        return x[..., 0].sum(axis=(-2, -1)) / np.maximum(x[..., 1].sum(axis=(-2, -1)), 1e-300)

    g = np.random.default_rng(seed)
    s_idx = g.integers(0, seeds, size=(n_boot, seeds))
    r_idx = g.integers(0, rows, size=(n_boot, seeds, rows))
    pick = (s_idx[:, :, None], r_idx)
    diffs = ratio(b[pick]) - ratio(a[pick])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return Interval(float(ratio(b[None])[0] - ratio(a[None])[0]), float(lo), float(hi), rows, seeds)


# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom 1–30; beyond, the next entry at or above
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
_T975_WIDE = ((40, 2.0211), (60, 2.0003), (120, 1.9799))


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (tabulated; conservative between
    the entries past 30: the value of the next smaller tabulated df)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    return next((t for d, t in reversed(_T975_WIDE) if df >= d), _T975[-1])


def mean_interval(xs: list[float]) -> tuple[float, float] | None:
    """The mean of ``xs`` (one value per seed) and the half-width of its 95% Student-t interval; None for
    fewer than two values."""
    if len(xs) < 2:
        return None
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), t975(len(a) - 1) * float(a.std(ddof=1)) / len(a) ** 0.5


@dataclass(frozen=True)
class LineFit:
    """Least squares ``y = intercept + slope · x`` over ``n`` points, and Pearson's r."""

    slope: float
    intercept: float
    r: float
    n: int
    x_mean: float
    sxx: float
    residual_sd: float

    def band(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The 95% Student-t interval of the fitted mean at ``x`` (low, high)."""
        fit = self.intercept + self.slope * x
        half = t975(self.n - 2) * self.residual_sd * np.sqrt(1 / self.n + (x - self.x_mean) ** 2 / self.sxx)
        return fit - half, fit + half


def line_fit(xs: list[float], ys: list[float]) -> LineFit | None:
    """The least-squares line through the points with its interval; None for fewer than 3 points or xs all equal."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    sxx = float(((x - x.mean()) ** 2).sum())
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * x.mean())
    resid = y - (intercept + slope * x)
    syy = float(((y - y.mean()) ** 2).sum())
    r = 0.0 if syy == 0 else slope * (sxx / syy) ** 0.5
    return LineFit(slope, intercept, r, len(x), float(x.mean()), sxx, float((resid @ resid / (len(x) - 2)) ** 0.5))


def binomial_bound(k: int, n: int, alpha: float, upper: bool) -> float:
    """Clopper-Pearson's one-sided exact bound at confidence 1 − ``alpha`` on a binomial proportion from ``k``
    successes in ``n`` trials: the largest π with P(X ≤ k; n, π) ≥ alpha (``upper``), or the smallest π with
    P(X ≥ k; n, π) ≥ alpha. Bisection on the exact tail (60 halvings: float precision)."""
    if n == 0:
        return 1.0 if upper else 0.0
    if (upper and k == n) or (not upper and k == 0):
        return 1.0 if upper else 0.0

    def tail(p: float) -> float:
        terms = range(k + 1) if upper else range(k, n + 1)
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in terms)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (tail(mid) >= alpha) == upper:
            lo = mid
        else:
            hi = mid
    return lo if upper else hi


def paired_drop_bounds(regressed: int, fixed: int, n_tasks: int, alpha: float) -> tuple[float, float]:
    """One-sided (1 − ``alpha``) exact bounds on the fall of a pass rate, (baseline − candidate) / tasks, from
    the discordant tasks of a paired comparison: given the d = regressed + fixed tasks that changed, each one
    a regression with probability π (Clopper-Pearson bounds on π), the fall is d(2π − 1) / n_tasks.
    Returns (lower, upper); a negative lower bound means a gain is not ruled out."""
    d = regressed + fixed
    if d == 0:
        return 0.0, 0.0
    lo, hi = (binomial_bound(regressed, d, alpha, upper) for upper in (False, True))
    return d * (2 * lo - 1) / n_tasks, d * (2 * hi - 1) / n_tasks
