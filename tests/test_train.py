"""kdkit train: falsification, invariants (accumulation, cache == live, resume), guards, merge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config.load import ConfigError, load_train_config
from kdkit.config.schema import RESOLVED_MARK
from kdkit.teacher.cache import TeacherCache
from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
from kdkit.train import FAULT_ENV, TrainingError, merge, micro_slices, step_rows, train
from kdkit.util.errors import KdkitError
from tests.helpers import save_model_dir, toy_rows, write_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_world")
    save_model_dir(root / "teacher", seed=1, hidden=32)
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(16))
    write_jsonl(root / "val.jsonl", toy_rows(6, seed=9))
    # K = V, float32 log-probs: the cache carries the whole teacher distribution
    precompute(root / "teacher", root / "train.jsonl", root / "cache_full",
               PrecomputeSettings(top_k=101, logprob_dtype="float32", shard_rows=8), progress=False, log=lambda m: None)
    return root


def _cfg(root: Path, tmp: Path, **sections) -> Path:
    base = {
        "student": {"path": str(root / "student"), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "teacher": {"cache": str(root / "cache_full")},
        "data": {"train": str(root / "train.jsonl"), "validation": str(root / "val.jsonl"), "max_length": 128},
        "objective": {"kd_weight": 1.0},
        "optim": {"lr": 5e-3, "micro_batch": 4, "grad_accum": 1, "epochs": 2, "schedule": "constant"},
        "checkpoint": {"every": 0},
    }
    for k, v in sections.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    p = tmp / f"cfg-{len(list(tmp.glob('cfg-*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def _run(cfg_path: Path, out: Path, **kw):
    return train(load_train_config(cfg_path), out, progress=False, log=lambda m: None, **kw)


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def _final(run: Path) -> dict[str, torch.Tensor]:
    lora = run / "final" / "adapter_model.safetensors"
    return load_file(str(lora if lora.is_file() else run / "final" / "model.safetensors"))


def test_training_moves_weights_and_kd_loss_falls(world, tmp_path):
    # pure KD (the tiny teacher is random, so CE would pull elsewhere): KL to the teacher must fall
    res = _run(_cfg(world, tmp_path, optim={"epochs": 3}, objective={"ce_coef": 0.0, "kd_weight": 1.0}), tmp_path / "run")
    run = Path(res["run_dir"])
    assert res["max_weight_change"] > 1e-3
    init = load_file(str(run / "initial_trainable.safetensors"))
    final = _final(run)
    assert any(not torch.equal(v, init[[n for n in init if n.endswith(k.replace(".weight", ".default.weight"))][0]])
               for k, v in final.items())
    epochs = _jsonl(run / "epochs.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert epochs[-1]["kl_loss"] < epochs[0]["kl_loss"]
    for key in ("train_loss", "val_loss", "ce_loss", "kl_loss", "total_loss"):
        assert key in epochs[0]
    steps = _jsonl(run / "metrics.jsonl")
    assert len(steps) == 12 and steps[0]["step"] == 1
    for key in ("lr", "total_loss", "ce_loss", "kl_loss", "barrier", "tail_mass", "top1_agree", "grad_norm",
                "tokens_per_s"):
        assert key in steps[0], key
    assert yaml.safe_load((run / "config.yaml").read_text())["objective"]["ce_coef"] == 0.0
    runinfo = json.loads((run / "run.json").read_text())
    assert len(runinfo["teacher_cache_manifest_sha256"]) == 64


def test_cached_teacher_equals_live_teacher(world, tmp_path):
    cached = _run(_cfg(world, tmp_path), tmp_path / "cached")
    live = _run(_cfg(world, tmp_path, teacher={"model": str(world / "teacher"), "cache": None}), tmp_path / "live")
    a = _jsonl(Path(cached["run_dir"]) / "metrics.jsonl")
    b = _jsonl(Path(live["run_dir"]) / "metrics.jsonl")
    for x, y in zip(a, b, strict=True):
        assert x["total_loss"] == pytest.approx(y["total_loss"], rel=1e-4)
        assert x["kl_loss"] == pytest.approx(y["kl_loss"], rel=1e-3, abs=1e-6)
    for k, v in _final(Path(cached["run_dir"])).items():
        torch.testing.assert_close(v, _final(Path(live["run_dir"]))[k], rtol=1e-3, atol=1e-5)


def test_a_validation_cache_reports_the_live_teachers_validation_kl_and_top1(world, tmp_path):
    """K = V float32 caches of the training and the validation rows: each epoch's validation KL and top-1 agreement
    equal the live teacher's."""
    val_cache = tmp_path / "val_cache"
    precompute(world / "teacher", world / "val.jsonl", val_cache,
               PrecomputeSettings(top_k=101, logprob_dtype="float32", shard_rows=8), progress=False, log=lambda m: None)
    cached = _run(_cfg(world, tmp_path, teacher={"cache": str(world / "cache_full"),
                                                 "validation_cache": str(val_cache)}), tmp_path / "cached")
    live = _run(_cfg(world, tmp_path, teacher={"model": str(world / "teacher"), "cache": None}), tmp_path / "live")
    a = _jsonl(Path(cached["run_dir"]) / "epochs.jsonl")
    b = _jsonl(Path(live["run_dir"]) / "epochs.jsonl")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert x["val_kl"] == pytest.approx(y["val_kl"], rel=1e-4, abs=1e-6) and x["val_kl"] > 0
        assert x["val_top1"] == pytest.approx(y["val_top1"], abs=1e-9) and 0 <= x["val_top1"] <= 1
    assert "val_kl" not in _jsonl(Path(_run(_cfg(world, tmp_path), tmp_path / "plain")["run_dir"]) / "epochs.jsonl")[0]
    inputs = json.loads((Path(cached["run_dir"]) / "inputs.json").read_text())
    assert any("validation_cache" in k for k in json.dumps(inputs).split('"'))  # part of the run's identity


@pytest.mark.parametrize("teacher, data, match", [
    ({"cache": "@cache_full", "validation_cache": "@cache_full"}, {}, r"^\S+\.yaml:\d+: teacher.validation_cache: "
                                                                      r".*cache field 'data'"),  # the training rows
    ({"model": "@teacher", "cache": None, "validation_cache": "@cache_full"}, {}, "a validation cache goes with a "
                                                                                   "cached teacher"),
    ({"cache": "@cache_full", "validation_cache": "@cache_full"}, {"validation": None}, "there is no data.validation"),
])
def test_a_validation_cache_that_cannot_serve_is_refused(world, tmp_path, teacher, data, match):
    teacher = {k: (str(world / v[1:]) if isinstance(v, str) and v.startswith("@") else v) for k, v in teacher.items()}
    sections = {"teacher": teacher}
    if data:
        sections["data"] = data
    with pytest.raises(KdkitError, match=match):
        _run(_cfg(world, tmp_path, **sections), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_batch_8_accum_1_equals_batch_2_accum_4(world, tmp_path):
    one = _run(_cfg(world, tmp_path, optim={"micro_batch": 8, "grad_accum": 1}), tmp_path / "b8")
    four = _run(_cfg(world, tmp_path, optim={"micro_batch": 2, "grad_accum": 4}), tmp_path / "b2x4")
    a, b = _jsonl(Path(one["run_dir"]) / "metrics.jsonl"), _jsonl(Path(four["run_dir"]) / "metrics.jsonl")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert x["total_loss"] == pytest.approx(y["total_loss"], rel=1e-5)
    fa, fb = _final(Path(one["run_dir"])), _final(Path(four["run_dir"]))
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-4, atol=1e-6)


def test_kill_9_after_checkpoint_then_resume_is_bitwise_equal(world, tmp_path):
    cfg = _cfg(world, tmp_path, optim={"micro_batch": 2, "epochs": 2}, checkpoint={"every": 3, "keep": 2})
    full = _run(cfg, tmp_path / "full")
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(run), "--no-progress"]
    # step 6 is mid-epoch 0 (8 steps per epoch)
    proc = subprocess.run(cmd, env={**os.environ, FAULT_ENV: "after_checkpoint:6"}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not (run / "final").exists()
    # a half-written checkpoint and one without its COMPLETE marker must be ignored
    (run / "checkpoints" / ".tmp-step-0000007").mkdir()
    (run / "checkpoints" / "step-0000008").mkdir()
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step-0000006" in proc.stdout
    a, b = _final(Path(full["run_dir"])), _final(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _jsonl(Path(full["run_dir"]) / "metrics.jsonl"), _jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in mb] == list(range(1, 17))
    assert [m["total_loss"] for m in ma] == [m["total_loss"] for m in mb]
    assert _jsonl(Path(full["run_dir"]) / "epochs.jsonl") == _jsonl(run / "epochs.jsonl")


def test_every_step_counts_where_the_barrier_was_above_tau_not_only_the_logged_ones(world, tmp_path):
    """A barrier of weight 0 measures its divergence and pulls on nothing, so τ and the logging interval leave
    training unchanged: a run logging every 3rd step counts, in epochs.jsonl, the same steps above τ as the
    per-step divergences of a run logging every step say."""
    def barrier(tau: float) -> dict:
        return {"barrier": {"kind": "kl_rev", "aggregate": "rmse", "tau": tau, "weight": 0.0}}

    every = _run(_cfg(world, tmp_path, objective=barrier(0.0), reference={"kind": "base"}, logging={"every": 1}),
                 tmp_path / "every")
    steps = _jsonl(Path(every["run_dir"]) / "metrics.jsonl")
    divs = sorted({s["barrier_div_rmse"] for s in steps})
    tau = divs[len(divs) // 2]  # the median: some steps above, some not
    sparse = _run(_cfg(world, tmp_path, objective=barrier(tau), reference={"kind": "base"}, logging={"every": 3}),
                  tmp_path / "sparse")
    logged = _jsonl(Path(sparse["run_dir"]) / "metrics.jsonl")
    assert len(logged) < len(steps) and [s["total_loss"] for s in logged] == [
        s["total_loss"] for s in steps if s["step"] in {x["step"] for x in logged}]  # the same training
    epochs = _jsonl(Path(sparse["run_dir"]) / "epochs.jsonl")
    for e, prev in zip(epochs, [0, *(x["step"] for x in epochs)], strict=False):
        in_epoch = [s for s in steps if prev < s["step"] <= e["step"]]
        assert e["barrier_steps"] == len(in_epoch)
        assert e["barrier_active_steps"] == sum(s["barrier_div_rmse"] > tau for s in in_epoch)
    assert 0 < sum(e["barrier_active_steps"] for e in epochs) < len(steps)


def test_barrier_reference_base_with_lora_equals_explicit_copy(world, tmp_path):
    barrier = {"kd_weight": 0.5, "barrier": {"kind": "kl_rev", "aggregate": "rmse", "tau": 0.0, "weight": 5.0}}
    a = _run(_cfg(world, tmp_path, objective=barrier, reference={"kind": "base"}), tmp_path / "base")
    b = _run(_cfg(world, tmp_path, objective=barrier, reference={"kind": "model", "path": str(world / "student")}),
             tmp_path / "copy")
    ma, mb = _jsonl(Path(a["run_dir"]) / "metrics.jsonl"), _jsonl(Path(b["run_dir"]) / "metrics.jsonl")
    assert ma[0]["barrier"] == 0.0 or ma[0]["barrier"] == pytest.approx(mb[0]["barrier"])
    assert ma[-1]["barrier"] > 0  # the student moved away from the base
    for x, y in zip(ma, mb, strict=True):
        assert x["barrier"] == pytest.approx(y["barrier"], rel=1e-4, abs=1e-7)
        # the divergence before the hinge, every aggregate, every step (τ = 0: the barrier is 5 × its rmse)
        assert x["barrier_div_mean"] <= x["barrier_div_rmse"] <= x["barrier_div_max"] + 1.01e-4  # rmse: √(x² + 1e-8)
        assert x["barrier_div_p95"] <= x["barrier_div_max"] + 1e-7
    assert ma[-1]["barrier"] == pytest.approx(5.0 * ma[-1]["barrier_div_rmse"], rel=1e-5)
    fa, fb = _final(Path(a["run_dir"])), _final(Path(b["run_dir"]))
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k])


def test_drift_guard_fails_loudly(world, tmp_path):
    with pytest.raises(TrainingError, match="no trainable weight moved"):
        _run(_cfg(world, tmp_path, optim={"lr": 1e-30, "epochs": 1}), tmp_path / "still")


def test_non_finite_loss_names_the_step(world, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "nan_student"
    save_model_dir(bad, seed=3, hidden=16)
    w = load_file(str(bad / "model.safetensors"))
    w["lm_head.weight"][0, 0] = float("nan")
    save_file(w, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrainingError, match="non-finite loss .* at step 1, micro-batch 0"):
        _run(_cfg(world, tmp_path, student={"path": str(bad), "lora": None}), tmp_path / "nan")


def test_full_finetune_and_merge_roundtrip(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = _run(_cfg(world, tmp_path), tmp_path / "lora")
    pack = merge(lora["run_dir"], tmp_path / "pack")
    merged = AutoModelForCausalLM.from_pretrained(str(pack)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(world / "student"))
    peft = PeftModel.from_pretrained(base, str(Path(lora["run_dir"]) / "final")).eval()
    x = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, peft(x).logits, rtol=1e-4, atol=1e-5)
    full = _run(_cfg(world, tmp_path, student={"path": str(world / "student"), "lora": None}), tmp_path / "full")
    pack2 = merge(full["run_dir"], tmp_path / "pack2")
    assert (pack2 / "model.safetensors").is_file()


def test_step_rows_partition_each_epoch():
    seen = []
    for s in range(4):
        rows = step_rows(14, s, 4, 4, seed=0)
        seen += rows
        for r in range(2):
            assert sum(len(m) for m in micro_slices(rows, 1, 2, 2, r)) <= 2
    assert sorted(seen) == list(range(14))
    assert step_rows(14, 4, 4, 4, seed=0) != step_rows(14, 0, 4, 4, seed=0)  # a new permutation next epoch


@pytest.mark.parametrize(
    "change, match",
    [
        ({"objective": {"kd": {"kind": "kl"}}}, r"cfg-0.yaml:\d+: field 'objective.kd.kind'"),
        ({"objective": {"kd": {"kind": "jsd", "beta": 2}}}, r"field 'objective.kd.beta'"),
        ({"objective": {"roles": {"poison": {"kd": False}}}}, r"objective.roles.poison: role 'poison' never occurs"),
        ({"objective": {"task_weights": {"HE/99": 4}}}, r"task 'HE/99' never occurs"),
        ({"reference": {"kind": "base"}}, r"'reference' is set but objective.barrier is not"),
        ({"objective": {"kd": {"temperature": 2.0}}}, r"captured at temperature 1.0 but objective.kd.temperature is 2.0"),
        ({"optim": {"lr": -1}}, r"field 'optim.lr'"),
        ({"optim": {"learning_rate": 1}}, r"field 'optim.learning_rate': unknown field \(did you mean 'optim.lr'\?\)"),
    ],
)
def test_validate_rejects_with_the_field_named(world, tmp_path, change, match):
    cfg = _cfg(world, tmp_path, **change)
    res = CliRunner().invoke(app, ["validate", str(cfg)], terminal_width=400)
    assert res.exit_code == 2, res.output
    assert __import__("re").search(match, " ".join(res.output.split())), res.output


def test_validate_rejects_a_cache_of_other_data(world, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", toy_rows(16, seed=4))
    cfg = _cfg(world, tmp_path, data={"train": str(other), "validation": None, "max_length": 128})
    res = CliRunner().invoke(app, ["validate", str(cfg)], terminal_width=400)
    assert res.exit_code == 2 and "cache field 'data'" in " ".join(res.output.split())


def test_validate_accepts_and_overrides_apply(world, tmp_path):
    cfg = _cfg(world, tmp_path)
    res = CliRunner().invoke(app, ["validate", str(cfg), "--set", "objective.kd.kind=jsd", "--set", "optim.lr=0.1"])
    assert res.exit_code == 0, res.output
    c = load_train_config(cfg, ["objective.kd.kind=jsd", "optim.lr=0.1"])
    assert c.objective.kd.kind == "jsd" and c.optim.lr == 0.1
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_train_config(cfg, ["nonsense"])


def test_cli_train_end_to_end(world, tmp_path):
    cfg = _cfg(world, tmp_path, optim={"epochs": 1})
    proc = subprocess.run([sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(tmp_path / "cli"),
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli" / "final" / "adapter_model.safetensors").is_file()
    again = subprocess.run([sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(tmp_path / "cli"),
                            "--no-progress"], capture_output=True, text=True)
    assert again.returncode == 1 and "not empty" in again.stderr


def test_chunked_loss_path_trains_like_the_dense_path(world, tmp_path):
    dense = _run(_cfg(world, tmp_path, objective={"kd_weight": 1.0, "chunk_size": 0}), tmp_path / "dense")
    chunk = _run(_cfg(world, tmp_path, objective={"kd_weight": 1.0, "chunk_size": 7}), tmp_path / "chunk")
    a, b = _jsonl(Path(dense["run_dir"]) / "metrics.jsonl"), _jsonl(Path(chunk["run_dir"]) / "metrics.jsonl")
    for x, y in zip(a, b, strict=True):
        for k in ("total_loss", "ce_loss", "kl_loss", "top1_agree", "tail_mass"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    fa, fb = _final(Path(dense["run_dir"])), _final(Path(chunk["run_dir"]))
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(world, tmp_path):
    """torchrun (gloo on CPU, what `accelerate launch` runs) with 2 ranks × micro-batch 2 == 1 rank × 4."""
    cfg = _cfg(world, tmp_path, optim={"micro_batch": 2, "grad_accum": 2, "epochs": 1})
    one = _run(_cfg(world, tmp_path, optim={"micro_batch": 4, "grad_accum": 2, "epochs": 1}), tmp_path / "one")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "kdkit", "train", str(cfg), "--out",
                           str(tmp_path / "two"), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("trained 2 steps") == 1, proc.stdout  # printed once, not once per rank
    assert "FutureWarning" not in proc.stderr
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    a, b = _final(Path(one["run_dir"])), _final(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    ma, mb = _jsonl(Path(one["run_dir"]) / "metrics.jsonl"), _jsonl(tmp_path / "two" / "metrics.jsonl")
    for x, y in zip(ma, mb, strict=True):
        assert x["total_loss"] == pytest.approx(y["total_loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_lora_with_a_barrier_to_the_base_under_two_processes_equals_one(world, tmp_path):
    """The seeds' headline configuration (LoRA, barrier to the adapters-off base) under torchrun."""
    barrier = {"kd_weight": 0.5, "barrier": {"kind": "kl_rev", "aggregate": "rmse", "tau": 0.0, "weight": 5.0}}
    cfg = _cfg(world, tmp_path, objective=barrier, reference={"kind": "base"},
               optim={"micro_batch": 2, "grad_accum": 2, "epochs": 1})
    one = _run(_cfg(world, tmp_path, objective=barrier, reference={"kind": "base"},
                    optim={"micro_batch": 4, "grad_accum": 2, "epochs": 1}), tmp_path / "one")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "kdkit", "train", str(cfg), "--out",
                           str(tmp_path / "two"), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ma, mb = _jsonl(Path(one["run_dir"]) / "metrics.jsonl"), _jsonl(tmp_path / "two" / "metrics.jsonl")
    assert ma[-1]["barrier"] > 0
    for x, y in zip(ma, mb, strict=True):
        assert x["total_loss"] == pytest.approx(y["total_loss"], rel=1e-5)
        assert x["barrier"] == pytest.approx(y["barrier"], rel=1e-4, abs=1e-7)
    a, b = _final(Path(one["run_dir"])), _final(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _fsdp(cfg: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """What README's many-GPUs section runs: accelerate launch with the shipped FSDP2 config, 2 CPU ranks."""
    accelerate = Path(sys.executable).with_name("accelerate")
    conf = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp2.yaml"
    return subprocess.run([str(accelerate), "launch", "--config_file", str(conf), "-m", "kdkit", "train", str(cfg),
                           "--out", str(out), "--no-progress", *extra], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def _assert_runs_agree(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    ma, mb = _jsonl(one / "metrics.jsonl"), _jsonl(two / "metrics.jsonl")
    assert len(ma) == len(mb)
    for x, y in zip(ma, mb, strict=True):
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    a, b = _final(one), _final(two)
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp_two_ranks_equal_one_process_for_full_fine_tuning(world, tmp_path):
    """FSDP2 shards the student (its LM head too) over 2 CPU ranks; the chunked loss and a live teacher."""
    sections = {"student": {"path": str(world / "student"), "lora": None},
                "teacher": {"cache": None, "model": str(world / "teacher")},
                "objective": {"kd_weight": 1.0, "chunk_size": 16}}
    one = _run(_cfg(world, tmp_path, optim={"micro_batch": 4, "grad_accum": 2, "epochs": 1}, **sections),
               tmp_path / "one")
    proc = _fsdp(_cfg(world, tmp_path, optim={"micro_batch": 2, "grad_accum": 2, "epochs": 1}, **sections),
                 tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "two" / "run.json").read_text())
    assert meta["distributed"] == "fsdp" and meta["world_size"] == 2 and meta["loss_path"].startswith("chunked")
    _assert_runs_agree(Path(one["run_dir"]), tmp_path / "two", ("total_loss", "kl_loss", "grad_norm"))


@pytest.mark.slow
def test_fsdp_lora_with_a_barrier_to_the_base_equals_one_process(world, tmp_path):
    barrier = {"kd_weight": 0.5, "barrier": {"kind": "kl_rev", "aggregate": "rmse", "tau": 0.0, "weight": 5.0}}
    one = _run(_cfg(world, tmp_path, objective=barrier, reference={"kind": "base"},
                    optim={"micro_batch": 4, "grad_accum": 2, "epochs": 1}), tmp_path / "one")
    proc = _fsdp(_cfg(world, tmp_path, objective=barrier, reference={"kind": "base"},
                      optim={"micro_batch": 2, "grad_accum": 2, "epochs": 1}), tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _jsonl(tmp_path / "two" / "metrics.jsonl")[-1]["barrier"] > 0
    _assert_runs_agree(Path(one["run_dir"]), tmp_path / "two", ("total_loss", "barrier", "grad_norm"))


@pytest.mark.slow
def test_fsdp_ctrl_c_and_resume_equal_the_uninterrupted_sharded_run(world, tmp_path):
    """Checkpoints gather the shards into the unsharded files; --resume scatters them back, bitwise."""
    cfg = _cfg(world, tmp_path, student={"path": str(world / "student"), "lora": None},
               optim={"micro_batch": 2, "grad_accum": 1, "epochs": 1})
    assert _fsdp(cfg, tmp_path / "full").returncode == 0
    proc = _fsdp(cfg, tmp_path / "cut", env={FAULT_ENV: "sigint:2"})
    assert "interrupted after step 2: saved" in proc.stdout, proc.stderr[-3000:]
    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    initial = load_file(str(tmp_path / "full" / "initial_trainable.safetensors"))
    assert {n: t.shape for n, t in saved.items()} == {n: t.shape for n, t in initial.items()}  # full, not shards
    proc = _fsdp(cfg, tmp_path / "cut", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _final(tmp_path / "full"), _final(tmp_path / "cut")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_saves_a_checkpoint_and_resume_completes_identically(world, tmp_path):
    cfg = _cfg(world, tmp_path, optim={"micro_batch": 2, "epochs": 1}, checkpoint={"every": 0})
    full = _run(cfg, tmp_path / "full")
    run = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, FAULT_ENV: "sigint:3"}, capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr[-1000:]
    assert "interrupted after step 3: saved" in proc.stdout
    assert (run / "checkpoints" / "step-0000003" / "COMPLETE").is_file()
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1000:]
    a, b = _final(Path(full["run_dir"])), _final(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _interrupt_and_resume(cfg: Path, run: Path, fault: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, FAULT_ENV: fault}, capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr[-1000:]
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    return proc


def test_real_sigint_mid_step_with_lora_dropout_resumes_bitwise(world, tmp_path):
    # dropout draws from the RNG during the step: a checkpoint taken mid-step would store a mid-step RNG state
    lora = {"r": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["q_proj", "v_proj"]}
    cfg = _cfg(world, tmp_path, student={"path": str(world / "student"), "lora": lora},
               optim={"micro_batch": 2, "grad_accum": 2, "epochs": 2})
    full = _run(cfg, tmp_path / "full")
    run = tmp_path / "interrupted"
    proc = _interrupt_and_resume(cfg, run, "sigint_mid:3")  # SIGINT after step 3's first micro-batch
    assert "finishing this step" in proc.stdout and "interrupted after step 3" in proc.stdout
    a, b = _final(Path(full["run_dir"])), _final(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _jsonl(Path(full["run_dir"]) / "metrics.jsonl"), _jsonl(run / "metrics.jsonl")
    assert [m["total_loss"] for m in ma] == [m["total_loss"] for m in mb]


def test_sigint_right_after_the_last_step_of_an_epoch_keeps_its_epoch_row(world, tmp_path):
    cfg = _cfg(world, tmp_path, optim={"micro_batch": 2, "epochs": 2})  # 8 steps per epoch
    full = _run(cfg, tmp_path / "full")
    run = tmp_path / "interrupted"
    _interrupt_and_resume(cfg, run, "sigint:8")
    assert _jsonl(Path(full["run_dir"]) / "epochs.jsonl") == _jsonl(run / "epochs.jsonl")
    assert [e["epoch"] for e in _jsonl(run / "epochs.jsonl")] == [0, 1]


def test_resume_refuses_a_changed_config_and_a_finished_run_is_left_alone(world, tmp_path):
    cfg = _cfg(world, tmp_path, optim={"micro_batch": 4, "epochs": 1})
    run = tmp_path / "run"
    _run(cfg, run)
    final_bytes = (run / "final" / "adapter_model.safetensors").read_bytes()
    changed = load_train_config(cfg, ["optim.lr=0.001", "objective.kd_weight=0.5"])
    with pytest.raises(TrainingError, match=r"objective.kd_weight: 1.0 → 0.5; optim.lr: 0.005 → 0.001"):
        train(changed, run, resume=True, progress=False, log=lambda m: None)
    # logging and checkpoint settings do not change what is trained; the finished run is not retrained
    cmd = [sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(run), "--no-progress", "--resume",
           "--set", "logging.every=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "the run is complete" in proc.stdout
    assert (run / "final" / "adapter_model.safetensors").read_bytes() == final_bytes
    assert not (run / "checkpoints").exists()


def test_resume_after_editing_the_runs_own_config_is_refused_naming_each_field(world, tmp_path):
    # The new user's case: interrupted at step 4, the run's own config.yaml edited (lr 0.005 → 0.3, a barrier's
    # tau), then `kdkit train RUN/config.yaml --out RUN --resume`. The weights were trained with the old
    # settings: the checkpoint says so, whatever config.yaml says now.
    cfg = _cfg(world, tmp_path, checkpoint={"every": 2}, reference={"kind": "base"},
               objective={"barrier": {"kind": "kl_rev", "aggregate": "rmse", "tau": 0.1, "weight": 1.0}})
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdkit", "train", str(run / "config.yaml"), "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd[:4] + [str(cfg)] + cmd[5:], env={**os.environ, FAULT_ENV: "sigint:4"},
                          capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr[-1000:]
    saved = yaml.safe_load((run / "config.yaml").read_text())

    def edit() -> None:  # as an editor would: the resolved mark stays
        (run / "config.yaml").write_text(RESOLVED_MARK + "\n" + yaml.safe_dump(saved, sort_keys=False))

    saved["optim"]["lr"], saved["objective"]["barrier"]["tau"] = 0.3, 5.0
    saved["logging"]["every"] = 3  # cannot change a result: reported, not refused
    edit()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode != 0 and "resumed from" not in resumed.stdout
    out = resumed.stdout + resumed.stderr
    assert "objective.barrier.tau: 0.1 → 5.0; optim.lr: 0.005 → 0.3" in " ".join(out.split()), out
    assert "checkpoints/step-0000004/state.json" in out and "logging.every" not in out.split("trained:")[1]
    # the saved settings back, a logging change alone: resumed, and the change is reported
    saved["optim"]["lr"], saved["objective"]["barrier"]["tau"] = 0.005, 0.1
    edit()
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-1000:]
    assert "settings that do not change the result changed: logging.every: 1 → 3" in again.stdout
    # a finished run remembers what it was trained with too
    saved["optim"]["lr"] = 0.3
    edit()
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert done.returncode != 0 and "final/kdkit.json" in done.stdout + done.stderr


def test_merge_never_replaces_a_directory_kdkit_did_not_write(world, tmp_path):
    from kdkit.util.errors import OutputDirError

    run = _run(_cfg(world, tmp_path, optim={"epochs": 1}), tmp_path / "run")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirError, match="not written by kdkit"):
        merge(run["run_dir"], user)
    assert (user / "notes.txt").read_text() == "keep me" and len(list(user.iterdir())) == 1
    pack = merge(run["run_dir"], tmp_path / "pack")
    again = merge(run["run_dir"], pack)  # an earlier pack is kdkit's own: replaced
    assert (again / "kdkit_pack.json").is_file()


def test_validate_checks_what_train_will_need(world, tmp_path):
    import shutil

    r = CliRunner()
    cache = tmp_path / "cache"
    shutil.copytree(world / "cache_full", cache)
    (cache / "shard-00001.safetensors").unlink()
    res = r.invoke(app, ["validate", str(_cfg(world, tmp_path, teacher={"cache": str(cache)}))])
    assert res.exit_code == 2 and "shard-00001.safetensors: missing" in res.output, res.output
    empty = tmp_path / "no_weights"
    shutil.copytree(world / "student", empty)
    (empty / "model.safetensors").unlink()
    res = r.invoke(app, ["validate", str(_cfg(world, tmp_path, student={"path": str(empty), "lora": None}))])
    assert res.exit_code == 2 and "no *.safetensors weights" in res.output, res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    cfg = _cfg(world, tmp_path, data={"train": str(bad), "validation": None}, teacher=None, objective={"kd_weight": 0.0})
    for cmd in (["validate", str(cfg)], ["train", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"],
                ["precompute", "--teacher", str(world / "teacher"), "--data", str(bad), "--out", str(tmp_path / "c")]):
        res = r.invoke(app, cmd)
        assert res.exit_code in (1, 2) and f"{bad}:2: not UTF-8 text" in res.output, (cmd, res.output)


@pytest.mark.parametrize("change, match", [
    ({"objective": {"kd": {"kind": "kl_fwd", "beta": 0.3}}}, "objective.kd.beta: only jsd takes beta"),
    ({"objective": {"kd": {"kind": "jsd", "alpha": 0.2}}}, "objective.kd.alpha: only skew_fwd/skew_rev take alpha"),
    ({"teacher": None, "objective": {"kd_weight": 0.5}}, "objective.kd_weight: there is no teacher section"),
    ({"teacher": None, "objective": {"kd_weight": 0.0, "task_weights": {"T/1": 4}}},
     "objective.task_weights.T/1: there is no teacher section"),
    ({"teacher": None, "objective": {"kd_weight": 0.0, "roles": {"anchor": {"kd": False}}}},
     "objective.roles.anchor.kd: there is no teacher section"),
    ({"teacher": None, "objective": {"kd_weight": 0.0, "kd": {"temperature": 2.0}}},
     "objective.kd.temperature: there is no teacher section"),
    ({"teacher": {"cache": "x", "dtype": "bfloat16"}}, "teacher.dtype: a cached teacher is not run"),
    ({"teacher": {"cache": None, "model": "x"}, "objective": {"kd": {"tail": "renorm"}}},
     "objective.kd.tail: a live teacher gives the dense distribution"),
])
def test_options_that_cannot_take_effect_are_refused_naming_the_field(world, tmp_path, change, match):
    res = CliRunner().invoke(app, ["validate", str(_cfg(world, tmp_path, **change))], terminal_width=400)
    assert res.exit_code == 2 and match in " ".join(res.output.split()), res.output


def test_a_reference_cache_at_another_temperature_is_refused(world, tmp_path):
    barrier = {"kd_weight": 0.5, "barrier": {"kind": "kl_rev", "temperature": 2.0}}
    cfg = _cfg(world, tmp_path, objective=barrier, reference={"kind": "cache", "path": str(world / "cache_full")})
    res = CliRunner().invoke(app, ["validate", str(cfg)], terminal_width=400)
    assert res.exit_code == 2 and "objective.barrier.temperature is 2.0" in " ".join(res.output.split()), res.output


def _padded_copy(src: Path, dst: Path, extra: int) -> Path:
    """The same model with `extra` more embedding/head rows (as 152,064 rows for 151,936 tokens), loud ones."""
    from transformers import AutoModelForCausalLM

    from kdkit.models.load import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(src))
    n = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(n + extra, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[n:] = 5.0  # would dominate every softmax if not dropped
    model.save_pretrained(str(dst), safe_serialization=True)
    load_tokenizer(src).save_pretrained(str(dst))
    return dst


def test_a_teacher_with_more_padded_rows_than_the_student_trains_as_the_unpadded_one(world, tmp_path):
    padded = _padded_copy(world / "teacher", tmp_path / "teacher_padded", 27)
    live = {"cache": None, "model": str(world / "teacher")}
    a = _run(_cfg(world, tmp_path, teacher=live, optim={"epochs": 1}), tmp_path / "unpadded")
    b = _run(_cfg(world, tmp_path, teacher={**live, "model": str(padded)}, optim={"epochs": 1}), tmp_path / "padded")
    fa, fb = _final(Path(a["run_dir"])), _final(Path(b["run_dir"]))
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=1e-5, atol=1e-7)
    # offline: a cache of the padded teacher holds no padded id and trains the 101-row student
    precompute(padded, world / "train.jsonl", tmp_path / "cache_padded",
               PrecomputeSettings(top_k=16, shard_rows=8), progress=False, log=lambda m: None)
    cache = TeacherCache(tmp_path / "cache_padded")
    assert cache.vocab_size == 128 and max(int(cache.row(r).ids.max()) for r in range(len(cache))) < 101
    _run(_cfg(world, tmp_path, teacher={"cache": str(tmp_path / "cache_padded")}, optim={"epochs": 1}),
         tmp_path / "from_cache")


def test_a_model_without_a_logit_for_every_token_is_refused(world, tmp_path):
    from kdkit.models.load import load_tokenizer
    from tests.helpers import tiny_llama

    short = tmp_path / "short"
    tiny_llama(96, seed=1).save_pretrained(str(short), safe_serialization=True)
    load_tokenizer(world / "teacher").save_pretrained(str(short))
    res = CliRunner().invoke(app, ["validate", str(_cfg(world, tmp_path, teacher={"cache": None, "model": str(short)}))],
                             terminal_width=400)
    assert res.exit_code == 2 and "has 96 output rows but the tokenizer has 101 tokens" in res.output, res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, 4/8-bit loading runs (with bitsandbytes)")
@pytest.mark.parametrize("change, match", [
    ({"student": {"load_in": "4bit"}}, "student.load_in='4bit' needs bitsandbytes on a CUDA GPU"),
    ({"teacher": {"cache": None, "model": "TEACHER", "load_in": "8bit"}}, "teacher.load_in='8bit' needs bitsandbytes"),
    ({"student": {"load_in": "4bit", "lora": None}}, "student.load_in: quantised weights cannot be fine-tuned in full"),
    ({"teacher": {"load_in": "8bit"}}, "teacher.load_in: a cached teacher is not run"),
])
def test_4_and_8_bit_loading_is_refused_where_it_cannot_run(world, tmp_path, change, match):
    if change.get("teacher", {}).get("model") == "TEACHER":
        change["teacher"]["model"] = str(world / "teacher")
    cfg = _cfg(world, tmp_path, **change)
    for cmd in (["validate", str(cfg)], ["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]):
        res = CliRunner().invoke(app, cmd, terminal_width=400)
        assert res.exit_code in (1, 2) and match in " ".join(res.output.split()), (cmd, res.output)
        assert not (tmp_path / "run" / "final").exists()


def test_checkpoints_carry_the_rng_state_of_every_gpu(monkeypatch):
    """Without a GPU here, the CUDA calls are stood in for: every device's state is saved and restored."""
    from kdkit.models import checkpoint as train_mod

    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.extend(s))
    saved = train_mod.rng_states()
    assert set(saved) == {"cpu", "cuda.0", "cuda.1"} and torch.equal(saved["cuda.1"], states[1])
    train_mod.set_rng_states(saved)
    assert [t.tolist() for t in restored] == [[1, 2, 3], [4, 5, 6]]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(TrainingError, match="RNG state of 2 GPU"):
        train_mod.set_rng_states(saved)


@pytest.mark.parametrize("change", [{}, {"teacher": None, "objective": {"kd_weight": 0.0}},
                                    {"teacher": {"cache": None, "model": "TEACHER"}}])
def test_a_runs_resolved_config_loads_again(world, tmp_path, change):
    """config.yaml lists every field with its value, defaults included: it must validate and resume as is."""
    import copy

    change = copy.deepcopy(change)
    if change.get("teacher") and change["teacher"].get("model") == "TEACHER":
        change["teacher"]["model"] = str(world / "teacher")
    run = tmp_path / "run"
    _run(_cfg(world, tmp_path, optim={"epochs": 1}, **change), run)
    res = CliRunner().invoke(app, ["validate", str(run / "config.yaml")], terminal_width=400)
    assert res.exit_code == 0, res.output
    done = train(load_train_config(run / "config.yaml"), run, resume=True, progress=False, log=lambda m: None)
    assert done["already_complete"]


def test_precompute_reads_capture_settings_from_the_training_config(world, tmp_path):
    """`kdkit precompute --config` captures at the config's temperature, max_length and truncation into its
    teacher.cache, so the run validates and trains on it; a differing option on the command line is refused."""
    cache = tmp_path / "cache_cfg"
    cfg = _cfg(world, tmp_path, teacher={"cache": str(cache)},
               data={"max_length": 40, "truncation": "right", "validation": None},
               objective={"kd_weight": 1.0, "kd": {"temperature": 2.0}})
    runner = CliRunner()
    bad = runner.invoke(app, ["precompute", "--config", str(cfg), "--teacher", str(world / "teacher"),
                              "--temperature", "1.0"], terminal_width=400)
    assert bad.exit_code == 2 and "--temperature 1.0 differs" in " ".join(bad.output.split())
    assert not cache.exists()
    res = runner.invoke(app, ["precompute", "--config", str(cfg), "--teacher", str(world / "teacher"), "--top-k", "8",
                              "--no-progress"], terminal_width=400)
    assert res.exit_code == 0, res.output
    man = json.loads((cache / "manifest.json").read_text())["components"]
    assert (man["temperature"], man["max_length"], man["top_k"]) == (2.0, 40, 8)
    assert runner.invoke(app, ["validate", str(cfg)], terminal_width=400).exit_code == 0
    missing = runner.invoke(app, ["precompute", "--config", str(cfg)], terminal_width=400)
    assert missing.exit_code == 2 and "missing --teacher" in missing.output


def test_bf16_mixed_tracks_fp32_and_gradient_checkpointing_changes_nothing(world, tmp_path):
    base = _run(_cfg(world, tmp_path, optim={"epochs": 1}), tmp_path / "fp32")
    mixed = _run(_cfg(world, tmp_path, optim={"epochs": 1, "precision": "bf16-mixed"}), tmp_path / "mixed")
    ckpt = _run(_cfg(world, tmp_path, optim={"epochs": 1, "gradient_checkpointing": True}), tmp_path / "ckpt")
    a, b, c = (_jsonl(Path(r["run_dir"]) / "metrics.jsonl") for r in (base, mixed, ckpt))
    # bf16 autocast of the forward: the same trajectory within 2% per step (stated tolerance), not bitwise
    for x, y in zip(a, b, strict=True):
        assert y["total_loss"] == pytest.approx(x["total_loss"], rel=2e-2)
    assert [x["total_loss"] for x in a] != [y["total_loss"] for y in b]
    # recomputed activations give the same losses and weights
    for x, z in zip(a, c, strict=True):
        assert z["total_loss"] == pytest.approx(x["total_loss"], rel=1e-6)
    fa, fc = _final(Path(base["run_dir"])), _final(Path(ckpt["run_dir"]))
    for k in fa:
        torch.testing.assert_close(fa[k], fc[k], rtol=1e-5, atol=1e-7)
    assert json.loads((Path(ckpt["run_dir"]) / "run.json").read_text())["gradient_checkpointing"] is True
    with pytest.raises(ConfigError, match="optim.precision: bf16-mixed keeps float32 master weights"):
        load_train_config(_cfg(world, tmp_path, optim={"precision": "bf16-mixed"},
                               student={"path": str(world / "student"), "dtype": "bfloat16"}))
    with pytest.raises(ConfigError, match="optim.precision: bf16 trains pure bfloat16 weights"):
        load_train_config(_cfg(world, tmp_path, optim={"precision": "bf16"}))


@pytest.mark.parametrize("section", [{"probes": {"prompts": "p.jsonl"}}, {"routing": {"pairs": "r.jsonl"}},
                                     {"objective": {"on_policy": {"fraction": 0.5}}},
                                     {"objective": {"hidden": {"layers": {"1": 2}}}}])
def test_a_sharded_run_refuses_what_it_cannot_do_by_field(section):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from kdkit.models.sharding import check_supported
    from kdkit.util.errors import UsageError

    cfg = {"objective": {"kd_weight": 1.0, "on_policy": None, "hidden": None}, "probes": None, "routing": None}
    for k, v in section.items():
        cfg[k] = {**cfg[k], **v} if isinstance(cfg[k], dict) else v
    check_supported(cfg, SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # data parallel: fine
    field = next(iter(section)) + ("." + next(iter(section["objective"])) if "objective" in section else "")
    with pytest.raises(UsageError, match=f"^{field}: .* not supported under FSDP"):
        check_supported(cfg, SimpleNamespace(distributed_type=DistributedType.FSDP))


def test_bf16_mixed_runs_the_default_chunked_loss_and_tracks_its_dense_path(tmp_path):
    # hidden 256: bfloat16 rounding of the head is far above 1e-3 here (it stopped the chunked path before)
    save_model_dir(tmp_path / "wide", seed=4, hidden=256)
    write_jsonl(tmp_path / "t.jsonl", toy_rows(8))
    runs = {}
    for name, chunk in (("chunked", "auto"), ("dense", 0)):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"student": {"path": str(tmp_path / "wide")},
                                       "data": {"train": str(tmp_path / "t.jsonl"), "max_length": 64},
                                       "objective": {"chunk_size": chunk}, "checkpoint": {"every": 0},
                                       "optim": {"lr": 1e-3, "micro_batch": 4, "epochs": 2, "precision": "bf16-mixed"}}))
        res = _run(cfg, tmp_path / name)
        runs[name] = _jsonl(Path(res["run_dir"]) / "metrics.jsonl")
    info = json.loads((tmp_path / "chunked" / "run.json").read_text())
    assert info["loss_path"].startswith("chunked") and info["precision"] == "bf16-mixed"
    for x, y in zip(runs["chunked"], runs["dense"], strict=True):
        assert x["total_loss"] == pytest.approx(y["total_loss"], rel=2e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast needs a GPU: refused only where there is none")
def test_fp16_mixed_without_a_gpu_is_refused_by_validate_and_train(world, tmp_path):
    cfg = _cfg(world, tmp_path, optim={"epochs": 1, "precision": "fp16-mixed"})
    res = CliRunner().invoke(app, ["validate", str(cfg)], terminal_width=400)
    assert res.exit_code == 2 and "optim.precision: fp16-mixed needs a CUDA GPU" in " ".join(res.output.split())
    with pytest.raises(KdkitError, match="optim.precision: fp16-mixed needs a CUDA GPU"):
        _run(cfg, tmp_path / "run")


@pytest.mark.slow
def test_the_fsdp_refusal_is_printed_once_for_the_run(world, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def f(x):\n"}])
    cfg = _cfg(world, tmp_path, optim={"epochs": 1}, probes={"prompts": str(tmp_path / "p.jsonl"), "every": 1})
    proc = _fsdp(cfg, tmp_path / "run")
    assert proc.returncode != 0
    assert proc.stderr.count("not supported under FSDP") == 1, proc.stderr[-3000:]


def test_train_package_functions_fit_on_a_screen():
    import ast

    root = Path(__file__).resolve().parents[1] / "src" / "kdkit" / "train"
    long = [(p.name, n.name, n.end_lineno - n.lineno + 1) for p in sorted(root.glob("*.py"))
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno - n.lineno + 1 > 80]
    assert long == []


def test_a_checkpoint_of_another_format_is_refused_and_one_without_a_format_resumes(world, tmp_path):
    import shutil

    cfg = _cfg(world, tmp_path, optim={"epochs": 1, "micro_batch": 4}, checkpoint={"every": 2, "keep": 1})
    run = tmp_path / "run"
    _run(cfg, run)
    shutil.rmtree(run / "final")  # as if the run had died after its last checkpoint
    state_p = next((run / "checkpoints").glob("step-*")) / "state.json"
    state = json.loads(state_p.read_text())
    assert state["format"] == 1
    state_p.write_text(json.dumps({**state, "format": 99}))
    with pytest.raises(TrainingError, match="a checkpoint of format 99; this kdkit reads format 1"):
        _run(cfg, run, resume=True)
    state.pop("format")  # as the previous release wrote it
    state_p.write_text(json.dumps(state))
    logs: list[str] = []
    train(load_train_config(cfg), run, resume=True, progress=False, log=logs.append)
    assert any("resumed from" in m for m in logs) and (run / "final").is_dir()


def test_rows_name_their_teacher_and_metrics_are_per_teacher(world, tmp_path):
    """A cache as the default teacher, a live model as teacher 'b' for the rows that name it."""
    save_model_dir(tmp_path / "teacher_b", seed=7, hidden=32)
    rows = toy_rows(16)
    for i, r in enumerate(rows):
        if i % 2:
            r["teacher"] = "b"
    write_jsonl(tmp_path / "routed.jsonl", rows)
    precompute(world / "teacher", tmp_path / "routed.jsonl", tmp_path / "cache",
               PrecomputeSettings(top_k=101, logprob_dtype="float32", shard_rows=8), progress=False, log=lambda m: None)
    data = {"train": str(tmp_path / "routed.jsonl"), "validation": None, "max_length": 128}
    cfg = _cfg(world, tmp_path, teacher={"cache": str(tmp_path / "cache")}, data=data,
               teachers={"b": {"model": str(tmp_path / "teacher_b")}})
    _run(cfg, tmp_path / "run")
    m = _jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all({"kl_loss@teacher", "kl_loss@b", "top1_agree@b"} <= set(x) for x in m)
    assert m[0]["kl_loss@teacher"] != m[0]["kl_loss@b"]
    # the overall KD mean is the token-weighted mean of the two teachers' means
    first = m[0]
    assert min(first["kl_loss@teacher"], first["kl_loss@b"]) <= first["kl_loss"] <= max(
        first["kl_loss@teacher"], first["kl_loss@b"])
    # a row naming a teacher the config lacks, and a configured teacher no row names: refused by field
    bad = rows[:3] + [{**rows[3], "teacher": "c"}]
    write_jsonl(tmp_path / "bad.jsonl", bad)
    model = {"model": str(world / "teacher")}
    live = {"teacher": {"cache": None, **model}, "teachers": {"b": model}}
    with pytest.raises(KdkitError, match=r"bad.jsonl:4: field 'teacher': 'c' is not one of the config's teachers"):
        _run(_cfg(world, tmp_path, data={**data, "train": str(tmp_path / "bad.jsonl")}, **live), tmp_path / "bad")
    with pytest.raises(KdkitError, match="teachers.b: no row of .* names teacher 'b'"):
        _run(_cfg(world, tmp_path, **live), tmp_path / "none")


def test_the_dense_path_says_what_it_holds():
    """A barrier (or another reason) takes the dense path: the note says why, the size of one copy of a micro-batch's
    logits, and what bounds it (SmolLM2, micro-batch 8 × 512 tokens: 0.75 GiB a copy; a run peaked at 13 GB)."""
    from kdkit.train.build import dense_path_note

    note = dense_path_note("the barrier needs full logits", 8, 512, 49152)
    assert note.startswith("note: using the dense loss path (the barrier needs full logits): ")
    assert "8 × 512 × 49,152 float32 = 0.75 GiB per copy" in note and "optim.grad_accum" in note
    assert "2 × 512 × 49,152 float32 = 0.19 GiB" in dense_path_note("x", 2, 512, 49152)
