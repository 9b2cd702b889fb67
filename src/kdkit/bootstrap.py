"""Paired bootstrap intervals for per-token averages over validation rows (and seeds).

A run's validation CE (or KL) is a ratio, Σ_rows loss / Σ_rows tokens. Two runs scored on the same rows are
compared by the difference of their ratios; its interval comes from resampling the rows — the same rows
for both runs, which is what makes it paired — and, when each arm has several seeds, the seeds first and
then the rows. Deterministic: the resampling generator is seeded.
"""

from __future__ import annotations

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
