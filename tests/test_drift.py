"""Drift from the base: both KLs per token against float64 references, the figures over a data file's target
tokens against a naive loop over the rows, and `kdkit eval --drift-from` end to end with its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.data import rows as kdata
from kdkit.evaluate.drift import DriftError, drift, per_token
from kdkit.models.load import load_causal_lm, load_tokenizer
from tests.helpers import save_model_dir, toy_rows, write_jsonl

runner = CliRunner()


def _kl64(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p ‖ q) of one position, float64, term by term."""
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return sum(float(lp[v].exp() * (lp[v] - lq[v])) for v in range(lp.shape[0]) if lp[v] > float("-inf"))


def test_both_kls_per_token_equal_float64_references():
    g = torch.Generator().manual_seed(3)
    cand, base = torch.randn(3, 5, 37, generator=g) * 3, torch.randn(3, 5, 37, generator=g) * 3
    base[0, 0, 4] = float("-inf")  # a token the base rules out: the forward KL takes no mass there
    forward, reverse = per_token(cand.to(torch.bfloat16), base.to(torch.bfloat16))
    assert forward.dtype == reverse.dtype == torch.float32
    c64, b64 = cand.to(torch.bfloat16).double(), base.to(torch.bfloat16).double()
    for i in range(3):
        for t in range(5):
            assert float(forward[i, t]) == pytest.approx(_kl64(b64[i, t], c64[i, t]), rel=1e-4, abs=1e-6)
            if (i, t) != (0, 0):  # KL(cand ‖ base) is infinite where the base rules a token out
                assert float(reverse[i, t]) == pytest.approx(_kl64(c64[i, t], b64[i, t]), rel=1e-4, abs=1e-6)
    assert torch.isfinite(forward).all() and torch.isfinite(reverse).all()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift_world")
    save_model_dir(root / "base", seed=2, hidden=16)
    shutil.copytree(root / "base", root / "cand")
    weights = load_file(str(root / "base" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) if "mlp" in k else v for k, v in weights.items()}
    save_file(moved, str(root / "cand" / "model.safetensors"))
    shutil.copytree(root / "base", root / "other")  # the same weights, another tokenizer
    tok = load_tokenizer(root / "other")
    tok.add_tokens(["<another>"])
    tok.save_pretrained(str(root / "other"))
    write_jsonl(root / "rows.jsonl", toy_rows(10))
    return root


def test_the_figures_are_the_mean_and_p95_over_every_target_token(world):
    got = drift(world / "cand", world / "base", world / "rows.jsonl", max_length=96, batch_size=3)
    tok = load_tokenizer(world / "base")
    rows, _ = kdata.load_dataset(tok, world / "rows.jsonl", max_length=96)
    cand, base = load_causal_lm(world / "cand"), load_causal_lm(world / "base")
    fwd, rev = [], []
    with torch.no_grad():
        for row in rows:  # one row at a time, no padding, full logits
            ids = torch.tensor([row.input_ids])
            c, b = cand(input_ids=ids).logits[0, :-1, :len(tok)], base(input_ids=ids).logits[0, :-1, :len(tok)]
            for t, on in enumerate(row.loss_mask[1:]):
                if on:
                    fwd.append(_kl64(b[t], c[t]))
                    rev.append(_kl64(c[t], b[t]))
    assert got.tokens == len(fwd) == sum(sum(r.loss_mask[1:]) for r in rows) and got.row_count == len(rows)
    import numpy as np

    assert got.kl_base_cand_mean == pytest.approx(np.mean(fwd), rel=1e-3)
    assert got.kl_base_cand_p95 == pytest.approx(np.percentile(fwd, 95), rel=1e-3)
    assert got.kl_cand_base_mean == pytest.approx(np.mean(rev), rel=1e-3)
    assert got.kl_cand_base_p95 == pytest.approx(np.percentile(rev, 95), rel=1e-3)
    assert 0 < got.kl_base_cand_mean < got.kl_base_cand_p95
    same = drift(world / "base", world / "base", world / "rows.jsonl", max_length=96)
    assert (same.kl_base_cand_mean, same.kl_cand_base_p95) == (0.0, 0.0)  # a model does not drift from itself


def test_eval_drift_from_writes_the_figures_and_refuses_what_cannot_apply(world, tmp_path):
    args = ["eval", str(world / "cand"), "--drift-from", str(world / "base"), "--rows", str(world / "rows.jsonl"),
            "--max-length", "96"]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "d")], terminal_width=200)
    assert res.exit_code == 0, res.output
    written = json.loads((tmp_path / "d" / "drift.json").read_text())
    direct = drift(world / "cand", world / "base", world / "rows.jsonl", max_length=96)
    assert written["kl_base_cand_mean"] == direct.kl_base_cand_mean and written["tokens"] == direct.tokens
    assert f"KL(base‖cand) mean {direct.kl_base_cand_mean:.4g}" in res.output
    for extra, words in ((["--max-new-tokens", "9"], "--max-new-tokens only take(s) effect with --tasks"),
                         (["--limit", "3"], "--limit only take(s) effect with --tasks")):
        res = runner.invoke(app, [*args, *extra], terminal_width=200)
        assert res.exit_code == 2 and words in " ".join(res.output.split()), res.output
    res = runner.invoke(app, args[:4], terminal_width=200)
    assert res.exit_code == 2 and "--drift-from BASE and --rows FILE go together" in res.output
    res = runner.invoke(app, ["eval", str(world / "cand")], terminal_width=200)
    assert res.exit_code == 2 and "give --tasks FILE" in res.output
    with pytest.raises(DriftError, match="its tokenizer is not"):
        drift(world / "cand", world / "other", world / "rows.jsonl")


def test_the_fitted_line_and_its_interval_equal_scipys():
    from scipy import stats

    from kdkit.decide.stats import line_fit

    xs = [0.01, 0.03, 0.02, 0.08, 0.05, 0.11, 0.07, 0.04]
    ys = [30, 29, 30, 25, 28, 22, 26, 29]
    fit, ref = line_fit(xs, ys), stats.linregress(xs, ys)
    assert (fit.slope, fit.intercept, fit.r) == pytest.approx((ref.slope, ref.intercept, ref.rvalue), rel=1e-12)
    x = np.array([0.0, 0.06, 0.12])
    resid = np.array(ys) - (ref.intercept + ref.slope * np.array(xs))
    s = np.sqrt(resid @ resid / (len(xs) - 2))
    half = stats.t.ppf(0.975, len(xs) - 2) * s * np.sqrt(1 / len(xs) + (x - np.mean(xs)) ** 2 /
                                                         np.sum((np.array(xs) - np.mean(xs)) ** 2))
    lo, hi = fit.band(x)
    assert np.allclose(hi - lo, 2 * half, rtol=1e-4)  # the t quantile is tabulated to 4 decimals
    assert line_fit(xs[:2], ys[:2]) is None and line_fit([0.1] * 4, [1, 2, 3, 4]) is None


def test_the_report_plots_anchor_pass_against_each_drift():
    from kdkit.decide.report import drift_plot

    def rung(i: int) -> dict:
        d = {"kl_base_cand_mean": 0.01 * i, "kl_cand_base_mean": 0.02 * i, "tokens": 10}
        return {"status": "done", "passed": 30 - i, "baseline_passed": 31, "drift": {"train": d, "anchors": None}}

    assert drift_plot([rung(i) for i in range(4)]).startswith("data:image/png;base64,")
    assert drift_plot([rung(1), rung(2)]).startswith("data:image/png;base64,")  # with the baseline: a line
    assert drift_plot([{**rung(1), "drift": None}, {"status": "failed"}]) is None


def test_an_adapter_drifts_as_its_merged_model_does(world, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(load_causal_lm(world / "base"), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                     target_modules=["q_proj", "v_proj"]))
    tok = load_tokenizer(world / "base")
    peft.save_pretrained(str(tmp_path / "adapter"))
    tok.save_pretrained(str(tmp_path / "adapter"))
    peft.merge_and_unload().save_pretrained(str(tmp_path / "merged"))
    tok.save_pretrained(str(tmp_path / "merged"))
    a = drift(tmp_path / "adapter", world / "base", world / "rows.jsonl", max_length=96)
    m = drift(tmp_path / "merged", world / "base", world / "rows.jsonl", max_length=96)
    assert a.tokens == m.tokens and a.kl_base_cand_mean > 0
    assert (a.kl_base_cand_mean, a.kl_cand_base_p95) == pytest.approx((m.kl_base_cand_mean, m.kl_cand_base_p95),
                                                                      rel=1e-4)
