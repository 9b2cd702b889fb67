"""Paired bootstrap intervals of per-token averages: exact cases, a naive float64 reference, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from kdkit.decide.stats import paired_difference


def _rows(g, n, shift=0.0):
    tokens = g.integers(1, 30, size=n).astype(float)
    return np.stack([tokens * (0.5 + shift) + g.normal(0, 1, n), tokens], -1)


def test_identical_runs_differ_by_zero_and_a_constant_shift_exactly():
    g = np.random.default_rng(1)
    a = _rows(g, 50)
    iv = paired_difference(a, a)
    assert (iv.delta, iv.low, iv.high) == (0.0, 0.0, 0.0)
    b = a.copy()
    b[:, 0] += 0.25 * b[:, 1]  # every token 0.25 nats worse
    iv = paired_difference(a, b)
    assert iv.delta == pytest.approx(0.25, abs=1e-12)
    assert iv.low == pytest.approx(0.25, abs=1e-12) and iv.high == pytest.approx(0.25, abs=1e-12)


def test_it_equals_a_naive_loop_over_the_same_draws():
    g = np.random.default_rng(2)
    a = np.stack([_rows(g, 12), _rows(g, 12)])  # 2 seeds × 12 rows
    b = np.stack([_rows(g, 12, 0.1), _rows(g, 12, 0.1)])
    iv = paired_difference(a, b, n_boot=300, seed=7)
    r = np.random.default_rng(7)
    s_idx = r.integers(0, 2, size=(300, 2))
    r_idx = r.integers(0, 12, size=(300, 2, 12))
    diffs = []
    for k in range(300):
        num_a = den_a = num_b = den_b = 0.0
        for j in range(2):
            for i in range(12):
                sa, ri = s_idx[k, j], r_idx[k, j, i]
                num_a += a[sa, ri, 0]
                den_a += a[sa, ri, 1]
                num_b += b[sa, ri, 0]
                den_b += b[sa, ri, 1]
        diffs.append(num_b / den_b - num_a / den_a)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    assert iv.low == pytest.approx(lo, abs=1e-12) and iv.high == pytest.approx(hi, abs=1e-12)
    assert iv.delta == pytest.approx(b[..., 0].sum() / b[..., 1].sum() - a[..., 0].sum() / a[..., 1].sum(), abs=1e-12)
    assert paired_difference(a, b, n_boot=300, seed=7) == iv  # deterministic
    assert iv.seeds == 2 and iv.rows == 12 and "12 rows × 2 seeds" in iv.text()


def test_the_interval_covers_a_real_difference_and_refuses_unpaired_rows():
    g = np.random.default_rng(3)
    a, b = _rows(g, 400), _rows(g, 400, 0.2)
    iv = paired_difference(a, b)
    assert iv.low < iv.delta < iv.high and iv.low > 0  # 0.2 per token, clear of noise at 400 rows
    with pytest.raises(ValueError, match="paired rows"):
        paired_difference(a, b[:10])


def test_t_quantiles_and_the_seed_interval_against_scipy():
    from scipy import stats

    from kdkit.decide.stats import mean_interval, t975

    for df in range(1, 31):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)
    for df in (31, 45, 70, 500):  # conservative past the table: at least the true quantile, within 0.05
        assert stats.t.ppf(0.975, df) <= t975(df) <= stats.t.ppf(0.975, df) + 0.05
    xs = [4.75, 4.86, 4.80]
    m, h = mean_interval(xs)
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    assert m == pytest.approx(np.mean(xs)) and m - h == pytest.approx(lo) and m + h == pytest.approx(hi)
    assert mean_interval([1.0]) is None
