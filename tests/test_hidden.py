"""Hidden-state distillation: the per-position losses and the projection's gradient against float64
references, a run that pulls the states together, exact resume, and a pack without the projection."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdkit.config.load import ConfigError, load_train_config
from kdkit.config.schema import HiddenConfig, ObjectiveConfig
from kdkit.train import merge, train
from kdkit.train.hidden import HiddenDistill, per_position
from kdkit.train.objective import hidden_term
from tests.helpers import kill_then_resume, read_jsonl, save_model_dir, toy_rows, write_config, write_jsonl


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_per_position_losses_match_float64_references(loss):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    got = per_position(a.to(torch.bfloat16), b.to(torch.bfloat16), loss)
    a64, b64 = a.to(torch.bfloat16).double(), b.to(torch.bfloat16).double()
    for i in range(2):
        for t in range(5):
            x, y = a64[i, t], b64[i, t]
            ref = (1 - float(x @ y) / (float(x.norm()) * float(y.norm()))) if loss == "cosine" else \
                sum(float(x[k] - y[k]) ** 2 for k in range(7)) / 7
            assert float(got[i, t]) == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_the_term_and_the_projections_gradient_equal_a_float64_reference(loss):
    cfg = ObjectiveConfig(hidden={"layers": {1: 2, 2: 3}, "loss": loss, "weight": 0.7},
                          roles={"anchor": {"kd": False}})
    torch.manual_seed(0)
    hd = HiddenDistill(cfg.hidden, student_width=6, teacher_width=9)
    s_states = tuple(torch.randn(2, 5, 6) for _ in range(3))
    t_states = {layer: torch.randn(2, 4, 9) for layer in (2, 3)}
    targets = torch.tensor([[5, 6, -100, 7], [-100, 3, 4, 8]])
    term, m = hidden_term(hd(s_states, t_states), targets, cfg, roles=["default", "anchor"],
                          row_weights=torch.tensor([2.0, 1.0]))
    term.backward()
    # float64 reference: only row 0 (row 1's role has KD off), its 3 target positions, weight 2, ÷ 4 tokens
    ws = {k: p.weight.detach().double().requires_grad_(True) for k, p in hd.proj.items()}
    ref = torch.zeros((), dtype=torch.float64)
    for s, t in ((1, 2), (2, 3)):
        for pos in (0, 1, 3):
            x, y = ws[str(s)] @ s_states[s][0, pos].double(), t_states[t][0, pos].double()
            v = 1 - (x @ y) / (x.norm() * y.norm()) if loss == "cosine" else ((x - y) ** 2).mean()
            ref = ref + 0.7 * 2.0 * v / 6.0  # the denominator: every target token of the micro-batch (6)
    ref.backward()
    assert float(term) == pytest.approx(float(ref), rel=1e-5)
    for k, p in hd.proj.items():
        assert torch.allclose(p.weight.grad.double(), ws[k].grad, rtol=1e-4, atol=1e-7), k
    assert m["hidden_tokens"] == 3.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hidden_world")
    save_model_dir(root / "teacher", seed=1, hidden=32, layers=3)
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(12))
    return root


def _body(root: Path, **hidden) -> dict:
    return {"student": {"path": str(root / "student"), "lora": {"r": 4, "alpha": 8, "dropout": 0.1,
                                                                "target_modules": ["q_proj", "v_proj"]}},
            "teacher": {"model": str(root / "teacher")},
            "data": {"train": str(root / "train.jsonl"), "max_length": 96},
            "objective": {"ce_coef": 0.0, "kd_weight": 0.0, "hidden": {"layers": {2: 3}, **hidden}},
            "optim": {"lr": 1e-2, "micro_batch": 4, "epochs": 4, "schedule": "constant"},
            "checkpoint": {"every": 0}}


_cfg, _jsonl = write_config, read_jsonl


def test_a_hidden_state_run_pulls_the_states_together_and_its_pack_has_no_projection(world, tmp_path):
    out = tmp_path / "run"
    train(load_train_config(_cfg(tmp_path, _body(world))), out, progress=False, log=lambda m: None)
    epochs = _jsonl(out / "epochs.jsonl")
    assert epochs[-1]["hidden_loss"] < 0.8 * epochs[0]["hidden_loss"], [e["hidden_loss"] for e in epochs]
    proj = load_file(str(out / "final" / "hidden_projection.safetensors"))
    assert list(proj) == ["proj.2.weight"] and proj["proj.2.weight"].shape == (32, 16)
    pack = merge(out, tmp_path / "pack")
    base = load_file(str(world / "student" / "model.safetensors"))
    assert set(load_file(str(pack / "model.safetensors"))) == set(base)  # the projection stays in the run


def test_resume_of_a_hidden_state_run_is_bitwise_exact(world, tmp_path):
    body = _body(world)
    body["objective"].update(ce_coef=1.0, kd_weight=0.5)
    body["checkpoint"] = {"every": 4, "keep": 2}
    cfg = _cfg(tmp_path, body)
    train(load_train_config(cfg), tmp_path / "full", progress=False, log=lambda m: None)
    kill_then_resume(cfg, tmp_path / "killed", "after_step:6")
    for f in ("adapter_model.safetensors", "hidden_projection.safetensors"):
        a, b = load_file(str(tmp_path / "full" / "final" / f)), load_file(str(tmp_path / "killed" / "final" / f))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    assert [m["total_loss"] for m in _jsonl(tmp_path / "full" / "metrics.jsonl")] == \
           [m["total_loss"] for m in _jsonl(tmp_path / "killed" / "metrics.jsonl")]


def test_hidden_settings_that_cannot_work_are_refused(world, tmp_path):
    body = _body(world)
    body["teacher"] = {"cache": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match="objective.hidden: hidden states come from a live teacher"):
        load_train_config(_cfg(tmp_path, body))
    from typer.testing import CliRunner

    from kdkit.cli import app
    from kdkit.util.errors import KdkitError

    for body, message in ((_body(world, layers={2: 9}), r"objective.hidden.layers: 2 → 9 is out of range"),
                          (_body(world, projection="none"), "projection: none needs equal widths")):
        cfg = _cfg(tmp_path, body)
        res = CliRunner().invoke(app, ["validate", str(cfg)], terminal_width=400)
        assert res.exit_code == 2 and re.search(message, " ".join(res.output.split())), res.output
        with pytest.raises(KdkitError, match=message):  # train refuses it the same way, before loading weights
            train(load_train_config(cfg), tmp_path / "run", progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="at least one"):
        HiddenConfig(layers={})
