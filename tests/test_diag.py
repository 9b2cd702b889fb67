"""`kdkit diag kl-agg`: the seeds' synthetic barrier case, computed by the library."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.loss.diag import kl_agg_demo


def _numpy_kl_rev_per_position(seed=0, vocab=200, positions=60):
    """Independent float64 recomputation of the seeds' per-position KL(student ‖ base)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((positions, vocab))

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p_ref = softmax(base)
    order = np.argsort(p_ref.mean(0))
    coh = base.copy()
    coh[:, order[len(order) // 2]] += 1.6
    inc = base.copy()
    for t in (12, 13, 14, 15):
        inc[t] = -10.0
        inc[t, order[3]] = 12.0
    kl = lambda p, q: (p * (np.log(p) - np.log(q))).sum(-1)  # noqa: E731
    return kl(softmax(coh), p_ref), kl(softmax(inc), p_ref)


def test_outlier_aggregates_separate_better_than_mean():
    res = kl_agg_demo(kind="kl_rev", tau=0.5)
    r = res.ratio
    assert r["mean"] < r["rmse"] < r["p95"] < r["max"]
    # the seeds' figures: mean ~0.38 under tau=0.5, rmse ~1.5, p95 ~3.8, max ~8.1
    assert not res.fires["incoherent"]["mean"]
    assert all(res.fires["incoherent"][h] for h in ("rmse", "p95", "max"))
    assert not any(res.fires["coherent"].values())


def test_values_match_an_independent_float64_computation():
    coh, inc = _numpy_kl_rev_per_position()
    res = kl_agg_demo(kind="kl_rev")
    for name, k in (("coherent", coh), ("incoherent", inc)):
        assert abs(res.values[name]["mean"] - k.mean()) < 1e-4 * max(1, k.mean())
        assert abs(res.values[name]["rmse"] - np.sqrt((k**2).mean() + 1e-8)) < 1e-4
        assert abs(res.values[name]["p95"] - np.percentile(k, 95)) < 1e-4 * max(1, np.percentile(k, 95))
        assert abs(res.values[name]["max"] - k.max()) < 1e-4 * max(1, k.max())


def test_cli_prints_the_table():
    out = CliRunner().invoke(app, ["diag", "kl-agg", "--tau", "0.5"], terminal_width=200)
    assert out.exit_code == 0, out.output
    res = kl_agg_demo(kind="kl_rev", tau=0.5)
    assert f"{res.values['incoherent']['rmse']:.3f}" in out.output
    assert f"{res.ratio['max']:.1f}x" in out.output
    assert "misses the incoherent student under: mean" in " ".join(out.output.split())
    bad = CliRunner().invoke(app, ["diag", "kl-agg", "--kind", "nope"])
    assert bad.exit_code == 2
