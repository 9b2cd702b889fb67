"""Probe rounds, the coherence metric and the coherence floor (seeds 002 and 004)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdkit.config.load import ConfigError, load_train_config
from kdkit.demo.run import TEACHER_DIR
from kdkit.demo.world import make_world, training_rows
from kdkit.evaluate.coherence import coherence, distinct_n, loop_mask
from kdkit.train import train
from tests.helpers import kill_then_resume, save_model_dir, toy_rows, write_jsonl

# ----------------------------------------------------------------------------- the metric

DOCUMENTED = [
    ("def f(x):\n    x = x * x\n    x = -x\n    return x\n", 1.0),  # code: indentation is not a loop
    ("The cat sat on the mat because it was warm.", 1.0),
    ("Wait... x == y", 1.0),  # a run of one mark is one unit
    ("a b c d e f a b c d e f", 1.0),  # a unit seen twice is not a loop (3 repeats make one)
    ("", 0.0),  # a probe that says nothing is not coherent
    ("the the the", 0.0),
    ("I love you. I love you. I love you. I love you.", 0.0),
    ("x = x = x = x = x = x", 0.0),
    ("Hello world. ha ha ha", 0.5),  # 3 of 6 units looped
    ("Hello world. ha ha ha ha", 3 / 7),
    ("On0474747474747474747474747474", 0.1),  # a loop inside one word: 27 of 30 characters
    # no tandem repeat (period 17 > 16), but degenerate: 17 distinct 3-grams of 49, below the 0.5 floor
    (" ".join(f"w{i}" for i in range(17)) + " " + " ".join(f"w{i}" for i in range(17)) + " "
     + " ".join(f"w{i}" for i in range(17)), (17 / 49) / 0.5),
]


@pytest.mark.parametrize("text, value", DOCUMENTED)
def test_coherence_gives_the_documented_values(text, value):
    assert coherence(text) == pytest.approx(value, abs=1e-12)


def test_loop_mask_marks_the_whole_run_and_nothing_else():
    seq = list("xyabababz")  # "ab" three times in a row: positions 2..7
    assert loop_mask(seq) == [False, False, True, True, True, True, True, True, False]
    assert not any(loop_mask(list("xyababz")))  # twice is not a loop
    assert loop_mask(list("aaab"), min_repeats=3) == [True, True, True, False]
    assert not any(loop_mask(list("aaab"), min_repeats=4))
    period_17 = [str(i) for i in range(17)] * 3  # longer than max_period: left to distinct-n
    assert not any(loop_mask(period_17))
    assert distinct_n(period_17) == pytest.approx(17 / 49)


# ----------------------------------------------------------------------------- probes in training


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("probes_world")
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(12))
    write_jsonl(root / "probes.jsonl", [{"prompt": "def f(x):\n"}, {"prompt": "def g(y):\n", "id": "g"},
                                        {"prompt": "Once upon"}])
    w = make_world(0)
    write_jsonl(root / "demo_prompts.jsonl", [{"prompt": t["prompt"]} for t in w.holdout[:4]])
    # completions that push the model into a loop
    write_jsonl(root / "loops.jsonl", [{"prompt": t["prompt"], "completion": "    x = x = x = x = x = x = x = x = x\n"}
                                       for t in w.train[:16]])
    write_jsonl(root / "demo_train.jsonl", training_rows(w.train[:16]))
    return root


def _cfg(tmp: Path, body: dict) -> Path:
    p = tmp / f"cfg-{len(list(tmp.glob('cfg-*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def _tiny(world: Path, **extra) -> dict:
    return {"student": {"path": str(world / "student"), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}},
            "data": {"train": str(world / "train.jsonl"), "max_length": 96},
            "reference": {"kind": "base"},
            "objective": {"barrier": {"kind": "kl_rev", "aggregate": "rmse", "tau": 0.0, "weight": 1.0}},
            "optim": {"lr": 1e-2, "micro_batch": 3, "epochs": 2, "schedule": "constant"},
            "checkpoint": {"every": 0},
            "probes": {"prompts": str(world / "probes.jsonl"), "every": 3, "max_new_tokens": 8}, **extra}


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_probes_run_at_step_0_every_n_steps_and_at_the_end(world, tmp_path):
    out = tmp_path / "run"
    train(load_train_config(_cfg(tmp_path, _tiny(world))), out, progress=False, log=lambda m: None)
    rounds = [m for m in _jsonl(out / "metrics.jsonl") if m.get("probe_round")]
    assert [m["step"] for m in rounds] == [0, 3, 6, 8]  # 8 steps: 12 rows / 3 × 2 epochs
    probes = _jsonl(out / "probes.jsonl")
    assert [(p["step"], p["prompt_id"]) for p in probes] == [(s, i) for s in (0, 3, 6, 8) for i in ("1", "g", "3")]
    for p in probes:
        assert 1 <= p["tokens"] <= 8 and p["coherence"] == pytest.approx(coherence(p["text"]))
    for m in rounds:
        assert m["probe_coherence"] == pytest.approx(sum(p["coherence"] for p in probes if p["step"] == m["step"]) / 3)
        assert m["probe_kl_to"] == "reference"
        assert m["probe_kl_mean"] <= m["probe_kl_rmse"] + 1e-6 and m["probe_kl_p95"] <= m["probe_kl_max"] + 1e-6
    # at step 0 the LoRA student is its base (B = 0): no divergence anywhere (rmse = √ε)
    first = rounds[0]
    assert first["probe_kl_mean"] == 0.0 and first["probe_kl_max"] == 0.0
    assert first["probe_kl_rmse"] == pytest.approx(1e-4, rel=1e-3)
    assert rounds[-1]["probe_kl_max"] > 0.0
    # training rows are unchanged by probes: the same run without them logs the same losses
    plain = _tiny(world)
    plain.pop("probes")
    train(load_train_config(_cfg(tmp_path, plain)), tmp_path / "plain", progress=False, log=lambda m: None)
    losses = [m["total_loss"] for m in _jsonl(out / "metrics.jsonl") if "total_loss" in m]
    assert losses == [m["total_loss"] for m in _jsonl(tmp_path / "plain" / "metrics.jsonl")]


def test_resume_neither_duplicates_nor_drops_probe_rounds(world, tmp_path):
    body = _tiny(world, checkpoint={"every": 4, "keep": 2})
    body["student"]["lora"]["dropout"] = 0.1
    cfg = _cfg(tmp_path, body)
    train(load_train_config(cfg), tmp_path / "full", progress=False, log=lambda m: None)
    run = tmp_path / "killed"

    def killed_after_step_7() -> None:  # the probe of step 6 written, the checkpoint of step 8 not yet
        assert [p["step"] for p in _jsonl(run / "probes.jsonl")][-1] == 6

    kill_then_resume(cfg, run, "after_step:7", killed_after_step_7)
    assert (run / "probes.jsonl").read_text() == (tmp_path / "full" / "probes.jsonl").read_text()
    strip = [{k: v for k, v in m.items() if k not in ("step_time_s", "tokens_per_s")}
             for m in _jsonl(run / "metrics.jsonl")]
    assert strip == [{k: v for k, v in m.items() if k not in ("step_time_s", "tokens_per_s")}
                     for m in _jsonl(tmp_path / "full" / "metrics.jsonl")]


@pytest.mark.skipif(not (TEACHER_DIR / "model.safetensors").is_file(), reason="no demo teacher")
def test_coherence_floor_stops_a_run_driven_into_loops_and_keeps_the_last_good_weights(world, tmp_path):
    body = {"student": {"path": str(TEACHER_DIR)},
            "data": {"train": str(world / "loops.jsonl"), "max_length": 256},
            "optim": {"lr": 3e-3, "micro_batch": 4, "epochs": 4, "schedule": "constant", "seed": 1},
            "checkpoint": {"every": 0},
            "probes": {"prompts": str(world / "demo_prompts.jsonl"), "every": 2, "max_new_tokens": 40},
            "early_stop": {"coherence_floor": 0.5, "patience": 2}}
    from typer.testing import CliRunner

    from kdkit.cli import app

    run = tmp_path / "run"
    cli = CliRunner().invoke(app, ["train", str(_cfg(tmp_path, body)), "--out", str(run), "--no-progress"],
                             terminal_width=400)
    assert cli.exit_code == 0, cli.output
    rounds = [m for m in _jsonl(run / "metrics.jsonl") if m.get("probe_round")]
    verdicts = [m["coherence_floor"] for m in rounds]
    assert rounds[0]["probe_coherence"] >= 0.5 and verdicts[0] == "good"  # the demo teacher writes code
    assert verdicts[-2:] == ["below", "stop"] and rounds[-1]["step"] < 16
    good = max(m["step"] for m in rounds if m["coherence_floor"] == "good")
    meta = json.loads((run / "run.json").read_text())["early_stop"]
    assert (meta["final_step"], meta["stopped_after_step"]) == (good, rounds[-1]["step"])
    said = " ".join(cli.output.split())  # the steps trained, and the step final/ holds: not one for the other
    assert f"trained {rounds[-1]['step']} steps" in said and f"final holds step {good}" in said, said
    assert json.loads((run / "final" / "kdkit.json").read_text())["steps"] == good
    # final/ is the run at that step: the same config stopped there by max_steps gives the same weights
    body.pop("early_stop")
    body["optim"]["max_steps"] = good
    train(load_train_config(_cfg(tmp_path, body)), tmp_path / "upto", progress=False, log=lambda m: None)
    a, b = load_file(str(run / "final" / "model.safetensors")), load_file(str(tmp_path / "upto" / "final" /
                                                                               "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stop_needs_probes(world, tmp_path):
    body = _tiny(world, early_stop={"coherence_floor": 0.5})
    body.pop("probes")
    with pytest.raises(ConfigError, match="early_stop: the coherence floor is judged on probe generations"):
        load_train_config(_cfg(tmp_path, body))


def test_validate_reads_the_probe_and_pair_files(world, tmp_path):
    from typer.testing import CliRunner

    from kdkit.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    body = _tiny(world)
    body["probes"]["prompts"] = str(bad)
    res = CliRunner().invoke(app, ["validate", str(_cfg(tmp_path, body))], terminal_width=300)
    assert res.exit_code == 2 and f"{bad}:2: field 'prompt'" in res.output, res.output
    body = _tiny(world)
    body["student"]["lora"]["target_modules"] = ["q_proj", "v_proj"]
    body["routing"] = {"pairs": str(bad), "target_modules": ["v_proj"]}
    res = CliRunner().invoke(app, ["validate", str(_cfg(tmp_path, body))], terminal_width=300)
    assert res.exit_code == 2 and f"{bad}:1: field 'hack'" in res.output, res.output
