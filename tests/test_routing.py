"""Gradient routing (seed 003): the projection against float64, the refresh, exact resume, knob-off deployment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config.load import ConfigError, load_train_config
from kdkit.models.load import load_causal_lm, load_tokenizer
from kdkit.train import train
from kdkit.train.routing import MAIN, QUARANTINE, extract, load_pairs, project_onto, project_out, routed_layers, share
from tests.helpers import kill_then_resume, read_jsonl, save_model_dir, toy_rows, write_config, write_jsonl


def test_projection_removes_exactly_the_directions_component():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(24, 4, generator=g, dtype=torch.float64)
    v = torch.randn(24, generator=g, dtype=torch.float64)
    v = v / v.norm()
    # float64 reference, written out: G − v (vᵀ G), column by column
    ref = grad.clone()
    for j in range(grad.shape[1]):
        ref[:, j] = grad[:, j] - v * sum(v[i] * grad[i, j] for i in range(24))
    assert torch.allclose(project_out(grad, v), ref, atol=1e-12)
    assert torch.allclose(v @ project_out(grad, v), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(project_out(grad, v) + project_onto(grad, v), grad, atol=1e-12)
    assert torch.allclose(project_onto(project_onto(grad, v), v), project_onto(grad, v), atol=1e-12)
    # share = cosine between G and its projection on v, over all modules together
    other = torch.randn(8, 2, generator=g, dtype=torch.float64)
    w = torch.zeros(8, dtype=torch.float64)
    w[0] = 1.0
    want = ((v @ grad).pow(2).sum() + other[0].pow(2).sum()).sqrt() / (grad.pow(2).sum() + other.pow(2).sum()).sqrt()
    assert share({"a": grad, "b": other}, {"a": v, "b": w}) == pytest.approx(float(want), rel=1e-12)
    assert share({"a": project_out(grad, v)}, {"a": v}) == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing_world")
    save_model_dir(root / "teacher", seed=1, hidden=32)
    save_model_dir(root / "student", seed=2, hidden=16)
    rows = toy_rows(12)
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "pairs.jsonl", [{"prompt": r["prompt"], "hack": "    return 0\n", "clean": r["completion"]}
                                       for r in rows[:4]])
    return root


def _body(root: Path, **routing) -> dict:
    return {"student": {"path": str(root / "student"), "lora": {"r": 4, "alpha": 8, "dropout": 0.1,
                                                                "target_modules": ["q_proj", "v_proj"]}},
            "teacher": {"model": str(root / "teacher")},
            "data": {"train": str(root / "train.jsonl"), "max_length": 96},
            "objective": {"kd_weight": 1.0},
            "optim": {"lr": 1e-2, "micro_batch": 3, "epochs": 2, "schedule": "constant"},
            "checkpoint": {"every": 0},
            "routing": {"pairs": str(root / "pairs.jsonl"), "target_modules": ["v_proj"], **routing}}


_cfg, _jsonl = write_config, read_jsonl


def _routed_model(root: Path):
    from peft import LoraConfig, get_peft_model

    from kdkit.config.schema import RoutingConfig
    from kdkit.train.routing import add_quarantine

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(root / "student"), LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules=["q_proj", "v_proj"]))
    add_quarantine(model, RoutingConfig(pairs=str(root / "pairs.jsonl"), target_modules=["v_proj"]))
    return model


@pytest.mark.parametrize("method", ["act", "grad"])
def test_a_refresh_changes_the_direction_and_leaves_no_grad_behind(world, method):
    model = _routed_model(world)
    tok = load_tokenizer(world / "student")
    layers = routed_layers(model, ["v_proj"])
    pairs = load_pairs(world / "pairs.jsonl", tok)
    before = extract(model, layers, pairs, method, tok.pad_token_id)
    assert all(float(v.norm()) == pytest.approx(1.0, abs=1e-6) for v in before.values())
    with torch.no_grad():  # the model moves (as training would move it)
        for m in layers.values():
            m.lora_B[MAIN].weight.normal_(0.0, 0.3)
            m.lora_B[QUARANTINE].weight.normal_(0.0, 0.3)
    state, mode = torch.get_rng_state(), model.training
    after = extract(model, layers, pairs, method, tok.pad_token_id)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(state, torch.get_rng_state()) and model.training is mode
    assert any(float((after[n] - before[n]).abs().max()) > 1e-3 for n in layers)
    # extraction ablates the quarantine: moving only the quarantine leaves the direction as it was
    with torch.no_grad():
        for m in layers.values():
            m.lora_B[QUARANTINE].weight.normal_(0.0, 0.3)
    again = extract(model, layers, pairs, method, tok.pad_token_id)
    assert all(torch.allclose(again[n], after[n], atol=1e-6) for n in layers)


def test_a_routed_run_logs_cin_cout_and_refreshes_on_schedule(world, tmp_path):
    out = tmp_path / "run"
    train(load_train_config(_cfg(tmp_path, _body(world, refresh_every=3))), out, progress=False, log=lambda m: None)
    rows = [m for m in _jsonl(out / "metrics.jsonl") if "total_loss" in m]
    assert [m["route_refresh"] for m in rows] == [float(s > 0 and s % 3 == 0) for s in range(len(rows))]
    for m in rows:
        assert m["route_cout"] < 1e-5 and 0.0 < m["route_cin"] <= 1.0
        assert 0.0 <= m["route_cin_t"] <= 1.0 and 0.0 <= m["route_cin_s"] <= 1.0
    # the quarantine learned (it is in the forward), and only along the directions of each module
    final = load_file(str(out / "final" / QUARANTINE / "adapter_model.safetensors"))
    assert any(float(t.abs().max()) > 0 for k, t in final.items() if "lora_B" in k)


def test_resume_across_a_refresh_is_bitwise_exact(world, tmp_path):
    body = _body(world, refresh_every=2, method="grad")
    body["checkpoint"] = {"every": 3, "keep": 2}
    cfg = _cfg(tmp_path, body)
    train(load_train_config(cfg), tmp_path / "full", progress=False, log=lambda m: None)
    run = tmp_path / "killed"
    kill_then_resume(cfg, run, "after_step:5")
    for sub in ("adapter_model.safetensors", f"{QUARANTINE}/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "full" / "final" / sub)), load_file(str(run / "final" / sub))
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    keys = ("step", "total_loss", "route_cin", "route_cout", "route_refresh", "route_cin_t", "route_cin_s")
    assert [[m.get(k) for k in keys] for m in _jsonl(run / "metrics.jsonl")] == \
           [[m.get(k) for k in keys] for m in _jsonl(tmp_path / "full" / "metrics.jsonl")]


def test_knob_off_is_the_merged_pack_without_the_quarantine(world, tmp_path):
    from peft import PeftModel

    out = tmp_path / "run"
    train(load_train_config(_cfg(tmp_path, _body(world, refresh_every=3))), out, progress=False, log=lambda m: None)
    runner = CliRunner()
    assert runner.invoke(app, ["merge", str(out), "--out", str(tmp_path / "off"), "--drop-adapter", QUARANTINE]
                         ).exit_code == 0
    assert runner.invoke(app, ["merge", str(out), "--out", str(tmp_path / "on")]).exit_code == 0
    # knob off, by hand: the base with the main adapter alone
    ref = PeftModel.from_pretrained(load_causal_lm(world / "student"), str(out / "final")).merge_and_unload()
    off = load_file(str(tmp_path / "off" / "model.safetensors"))
    on = load_file(str(tmp_path / "on" / "model.safetensors"))
    for name, p in ref.state_dict().items():
        assert torch.equal(off[name], p), name
    assert any(not torch.equal(on[k], off[k]) for k in off if "v_proj" in k)
    assert all(torch.equal(on[k], off[k]) for k in off if "v_proj" not in k)
    bad = runner.invoke(app, ["merge", str(out), "--out", str(tmp_path / "x"), "--drop-adapter", "nope"],
                        terminal_width=300)
    assert bad.exit_code == 2 and "--drop-adapter nope" in bad.output and "quarantine" in bad.output


@pytest.mark.parametrize("change, match", [
    ({"control": "random", "refresh_every": 5}, "routing.refresh_every: a random direction does not depend"),
    ({"control": "random", "method": "grad"}, "routing.method: routing.control is random"),
    ({"seed": 3}, "routing.seed: only the random control"),
    ({"target_modules": ["o_proj"]}, "routing.target_modules: 'o_proj' is not in student.lora.target_modules"),
])
def test_routing_settings_that_cannot_take_effect_are_refused(world, tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(_cfg(tmp_path, _body(world, **change)))
    body = _body(world)
    body["student"].pop("lora")
    with pytest.raises(ConfigError, match="routing: routing edits the main LoRA adapter's gradient"):
        load_train_config(_cfg(tmp_path, body))


@pytest.mark.slow
def test_routing_under_two_processes_equals_one(world, tmp_path):
    """torchrun, 2 CPU ranks × micro-batch 2 == 1 process × micro-batch 4: gradients are averaged before the
    routing hook edits them, and both ranks extract the same directions."""
    import subprocess
    import sys

    body = _body(world, refresh_every=2)
    body["student"]["lora"]["dropout"] = 0.0
    one = dict(body, optim={**body["optim"], "micro_batch": 4, "epochs": 1})
    two = dict(body, optim={**body["optim"], "micro_batch": 2, "epochs": 1})
    train(load_train_config(_cfg(tmp_path, one)), tmp_path / "one", progress=False, log=lambda m: None)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "kdkit", "train", str(_cfg(tmp_path, two)),
                           "--out", str(tmp_path / "two"), "--no-progress"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for sub in ("adapter_model.safetensors", f"{QUARANTINE}/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "one" / "final" / sub)), load_file(str(tmp_path / "two" / "final" / sub))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    ma, mb = _jsonl(tmp_path / "one" / "metrics.jsonl"), _jsonl(tmp_path / "two" / "metrics.jsonl")
    for x, y in zip(ma, mb, strict=True):
        assert y["route_refresh"] == x["route_refresh"] and y["route_cout"] < 1e-5
        assert y["total_loss"] == pytest.approx(x["total_loss"], rel=1e-5)
