"""kdkit barrier tau: the least move to a target probability (against float64 and a search over
distributions), and the figures of a real run against a naive per-row float64 computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config.load import load_train_config
from kdkit.data.rows import load_dataset
from kdkit.loss.divergences import TopK, token_divergence
from kdkit.models.load import load_tokenizer
from kdkit.train.tau import least_move, propose_tau, target_logprob
from tests.helpers import save_model_dir, toy_rows, write_config, write_jsonl


def _kl(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * (np.log(a) - np.log(b))))


@pytest.mark.parametrize("kind", ["kl_rev", "kl_fwd"])
def test_least_move_is_the_divergence_of_the_proportional_move_and_the_least(kind):
    rng = np.random.default_rng(0)
    for trial in range(20):
        p = rng.dirichlet(np.ones(9) * 0.5)
        y = int(np.argmin(p)) if trial % 2 else int(rng.integers(9))
        for a in (0.3, 0.5, 0.9):
            got = float(least_move(torch.tensor([math.log(p[y])]), a, kind)[0])
            if p[y] >= a:
                assert got == 0.0
                continue
            q = p * (1 - a) / (1 - p[y])
            q[y] = a
            want = _kl(q, p) if kind == "kl_rev" else _kl(p, q)
            assert got == pytest.approx(want, rel=1e-5)
            # the same through the barrier's own divergence (student q, reference p)
            div = token_divergence(torch.tensor(np.log(q))[None], torch.tensor(np.log(p))[None], kind, t2_scale=False)
            assert float(div[0]) == pytest.approx(want, rel=1e-4, abs=1e-6)
            for _ in range(50):  # any other distribution giving the target a is further away
                rest = rng.dirichlet(np.ones(8))
                other = np.insert(rest * (1 - a), y, a)
                d = _kl(other, p) if kind == "kl_rev" else _kl(p, other)
                assert d >= want - 1e-9


def test_target_logprob_dense_at_temperature_and_topk_inside_and_outside():
    logits = torch.tensor([[[2.0, 0.5, -1.0, 0.0]]]).repeat(1, 2, 1)
    targets = torch.tensor([[1, -100]])
    lp = target_logprob(logits, targets, 2.0)
    assert float(lp[0, 0]) == pytest.approx(float(torch.log_softmax(logits[0, 0] / 2.0, -1)[1]), abs=1e-6)
    assert float(lp[0, 1]) == 0.0
    full = torch.log_softmax(logits, -1)
    top = TopK(ids=torch.tensor([[[0, 3]]]).repeat(1, 2, 1), logprobs=full[..., [0, 3]])
    tail = math.log(float(full[0, 0, [1, 2]].exp().sum()))
    assert float(target_logprob(top, torch.tensor([[3, 1]]), 1.0)[0, 0]) == pytest.approx(float(full[0, 0, 3]), abs=1e-6)
    assert float(target_logprob(top, torch.tensor([[3, 1]]), 1.0)[0, 1]) == pytest.approx(tail, abs=1e-5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tau_world")
    save_model_dir(root / "reference", seed=1, hidden=16)
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(12))
    return root


def _config(world, tmp_path, reference: dict, aggregate: str = "rmse"):
    return write_config(tmp_path, {
        "student": {"path": str(world / "student"), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train": str(world / "train.jsonl"), "max_length": 128},
        "objective": {"roles": {"anchor": {"barrier": True}, "new": {"barrier": False}},
                      "barrier": {"kind": "kl_rev", "aggregate": aggregate, "tau": 0.3, "temperature": 2.0}},
        "reference": reference,
        # one step of one micro-batch holding every row: the aggregates are over all anchor positions
        "optim": {"lr": 1e-3, "micro_batch": 12, "grad_accum": 1, "epochs": 1},
        "checkpoint": {"every": 0},
    })


def _naive(world, model_dir, student_dir, a: float, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Per anchor position, float64, one row at a time: KL(student ‖ reference) and the least move."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(student_dir))
    rows, _ = load_dataset(tok, str(world / "train.jsonl"), max_length=128)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir)).double().eval()
    stu = AutoModelForCausalLM.from_pretrained(str(student_dir)).double().eval()
    start, move = [], []
    for row in rows:
        if row.role != "anchor":
            continue
        ids = torch.tensor([row.input_ids])
        with torch.no_grad():
            lr = torch.log_softmax(ref(ids).logits[0, :-1] / temperature, -1).numpy()
            ls = torch.log_softmax(stu(ids).logits[0, :-1] / temperature, -1).numpy()
        for t in range(len(row.input_ids) - 1):
            if not row.loss_mask[t + 1]:
                continue
            p, q = np.exp(lr[t]), np.exp(ls[t])
            start.append(float(np.sum(q * (ls[t] - lr[t]))))
            py = p[row.input_ids[t + 1]]
            move.append(0.0 if py >= a else a * math.log(a / py) + (1 - a) * math.log((1 - a) / (1 - py)))
    return np.array(start), np.array(move)


def test_figures_equal_a_naive_float64_pass_over_the_rows(world, tmp_path):
    cfg = load_train_config(_config(world, tmp_path, {"kind": "model", "path": str(world / "reference")}))
    logs: list[str] = []
    fig = propose_tau(cfg, steps=1, target_prob=0.5, log=logs.append)
    assert any(m.startswith("barrier tau: 1/1 steps (100%)") for m in logs), logs  # progress, as it measures
    start, move = _naive(world, world / "reference", world / "student", 0.5, 2.0)
    assert fig["micro_batches"] == 1 and fig["positions"] == len(move) > 0
    assert move.min() > 0  # a random tiny reference is near uniform: every target needs a move (0s: unit test above)
    for name, v in (("at_step_0", start), ("least_move", move)):
        tol = dict(rel=1e-4, abs=1e-6)  # float32 against float64: the KL at step 0 is small (~2e-3)
        assert fig[name]["mean"] == pytest.approx(v.mean(), **tol)
        assert fig[name]["rmse"] == pytest.approx(math.sqrt((v * v).mean() + 1e-8), **tol)
        assert fig[name]["max"] == pytest.approx(v.max(), **tol)
        assert fig[name]["p95"] == pytest.approx(np.percentile(v, 95), **tol)
    assert fig["proposed_tau"] == fig["least_move"]["rmse"] and fig["aggregate"] == "rmse"


def test_a_barrier_to_the_base_starts_at_zero_and_the_cli_proposes(world, tmp_path):
    path = _config(world, tmp_path, {"kind": "base"}, aggregate="p95")
    out = tmp_path / "tau.json"
    res = CliRunner().invoke(app, ["barrier", "tau", str(path), "--steps", "1", "--target-prob", "0.9",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    fig = json.loads(out.read_text())
    assert fig["at_step_0"]["mean"] == pytest.approx(0.0, abs=1e-6)  # LoRA's B = 0: the student is its base
    _, move = _naive(world, world / "student", world / "student", 0.9, 2.0)
    assert fig["proposed_tau"] == pytest.approx(np.percentile(move, 95), rel=1e-4)
    assert f"--set objective.barrier.tau={fig['proposed_tau']:.4g}" in res.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".yaml") == ["tau.json"]  # nothing else written


def test_refusals_name_what_is_wrong(world, tmp_path):
    path = _config(world, tmp_path, {"kind": "base"})
    res = CliRunner().invoke(app, ["barrier", "tau", str(path), "--target-prob", "1.0"])
    assert res.exit_code == 2 and "--target-prob must be in (0, 1)" in res.output
    plain = write_config(tmp_path, {"student": {"path": str(world / "student")},
                                    "data": {"train": str(world / "train.jsonl")}})
    res = CliRunner().invoke(app, ["barrier", "tau", str(plain)])
    assert res.exit_code == 2 and "objective.barrier is not set" in res.output
