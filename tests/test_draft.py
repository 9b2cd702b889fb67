"""`kdkit draft measure`: expected speculative acceptance against naive float64 references, known values of the
speed-up formula, and transformers' assisted generation on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.decide.draft import acceptance, expected, measured, speedup, tokens_per_step
from kdkit.models.load import load_causal_lm, load_tokenizer
from tests.helpers import save_model_dir, write_jsonl


def test_acceptance_is_one_minus_the_total_variation_in_float64_and_finite_on_inf_and_bf16():
    g = torch.Generator().manual_seed(0)
    t, d = torch.randn(5, 7, 50, generator=g) * 3, torch.randn(5, 7, 50, generator=g) * 3
    t[..., :5] = float("-inf")  # a masked vocabulary slice in the target only
    sample, greedy = acceptance(t, d)
    pt, pd = (torch.softmax(x.double(), -1).numpy() for x in (t, d))
    assert np.allclose(sample.numpy(), 1 - 0.5 * np.abs(pt - pd).sum(-1), atol=1e-6)
    assert torch.equal(greedy, (t.argmax(-1) == d.argmax(-1)).float())
    same, top = acceptance(t, t.clone())
    assert torch.allclose(same, torch.ones_like(same), atol=1e-6) and bool(top.all())
    half, _ = acceptance(t.bfloat16(), d.bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half).all() and torch.allclose(half, sample, atol=2e-2)
    disjoint = torch.full((2, 4), float("-inf"))
    a, b = disjoint.clone(), disjoint.clone()
    a[:, 0], b[:, 1] = 0.0, 0.0
    assert torch.equal(acceptance(a, b)[0], torch.zeros(2))


def test_the_expected_tokens_per_step_and_speed_up():
    assert tokens_per_step(0.0, 4) == 1.0 and tokens_per_step(1.0, 4) == 5.0
    assert tokens_per_step(0.5, 3) == pytest.approx((1 - 0.5 ** 4) / 0.5) == pytest.approx(1.875)
    assert speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8 ** 5) / 0.2 / 1.4)
    with pytest.raises(ValueError):
        tokens_per_step(1.2, 4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    save_model_dir(root / "target", seed=1, hidden=32)
    save_model_dir(root / "draft", seed=2, hidden=16)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in ("def f(x):\n", "Once upon", "return ", "x = 1\n")])
    return root


def test_expected_acceptance_is_each_prefix_judged_alone_and_one_for_the_target_itself(pair):
    tok = load_tokenizer(pair / "target")
    t, d = load_causal_lm(pair / "target").eval(), load_causal_lm(pair / "draft").eval()
    prompts = [tok("def f(x):\n")["input_ids"], tok("Once upon")["input_ids"]]
    fig = expected(t, d, tok, prompts, 8, gamma=3, cost_ratio=0.25)
    from kdkit.models.generation import GenerationSettings, generate_ids

    rows = []
    for ids in prompts:  # the reference: each continuation position's prefix through both models on its own
        cont = generate_ids(t, tok, [ids], GenerationSettings(max_new_tokens=8))[0]
        acc = []
        for k in range(len(cont)):
            prefix = torch.tensor([list(ids) + cont[:k]])
            with torch.no_grad():
                pt = torch.softmax(t(prefix).logits[0, -1].double(), -1)
                pd = torch.softmax(d(prefix).logits[0, -1].double(), -1)
            acc.append(float(torch.minimum(pt, pd).sum()))
        rows.append(np.mean(acc))
    assert fig.rows == 2 and fig.alpha_sample == pytest.approx(np.mean(rows), abs=1e-5)
    assert 0 < fig.alpha_sample < 1 and fig.alpha_sample_halfwidth is not None
    assert fig.expected_tokens_per_step == pytest.approx(tokens_per_step(fig.alpha_greedy, 3))
    self_fig = expected(t, t, tok, prompts, 8, gamma=3, cost_ratio=1.0)
    assert self_fig.alpha_sample == pytest.approx(1.0, abs=1e-5) and self_fig.alpha_greedy == 1.0
    assert self_fig.expected_tokens_per_step == 4.0


def test_assisted_generation_returns_the_targets_greedy_output_and_its_forwards_are_counted(pair):
    tok = load_tokenizer(pair / "target")
    t, d = load_causal_lm(pair / "target").eval(), load_causal_lm(pair / "draft").eval()
    prompts = [tok("def f(x):\n")["input_ids"], tok("x = 1\n")["input_ids"]]
    m = measured(t, d, tok, prompts, 12, gamma=3)
    assert m["same_output"] and m["tokens"] > 0 and 1.0 <= m["tokens_per_forward"] <= 4.0
    itself = measured(t, load_causal_lm(pair / "target").eval(), tok, prompts, 12, gamma=3)
    assert itself["same_output"] and itself["tokens_per_forward"] > m["tokens_per_forward"]


def test_draft_measure_cli(pair, tmp_path):
    res = CliRunner().invoke(app, ["draft", "measure", "--target", str(pair / "target"), "--draft", str(pair / "draft"),
                                   "--data", str(pair / "prompts.jsonl"), "--max-new-tokens", "6", "--gamma", "2",
                                   "--json", str(tmp_path / "d.json")], terminal_width=200)
    assert res.exit_code == 0, res.output
    fig = json.loads((tmp_path / "d.json").read_text())
    assert fig["rows"] == 4 and fig["measured"]["same_output"] and f"{fig['alpha_sample']:.3f}" in res.output
    assert 0 < fig["cost_ratio"] < 1  # the parameter-count proxy: a smaller draft costs less
    other = save_model_dir(tmp_path / "wide", seed=3, hidden=16, extra_vocab=5)
    res = CliRunner().invoke(app, ["draft", "measure", "--target", str(pair / "target"), "--draft", str(other),
                                   "--data", str(pair / "prompts.jsonl"), "--no-assisted"])
    assert res.exit_code == 2 and "needs one tokenizer" in res.output
