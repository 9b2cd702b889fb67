"""Identity is every input: a resume on edited data, teacher, student, tokenizer or chat template is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdkit.config.load import load_train_config
from kdkit.teacher.fleet import served_identity
from kdkit.train import FAULT_ENV, TrainingError, train
from kdkit.util.identity import changed_inputs, path_identity, run_inputs
from tests.helpers import save_model_dir, toy_rows, write_config, write_jsonl


@pytest.fixture()
def world(tmp_path):
    save_model_dir(tmp_path / "teacher", seed=1, hidden=32)
    save_model_dir(tmp_path / "student", seed=2, hidden=16)
    write_jsonl(tmp_path / "train.jsonl", toy_rows(8))
    cfg = write_config(tmp_path, {
        "student": {"path": str(tmp_path / "student")},
        "teacher": {"model": str(tmp_path / "teacher")},
        "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 64},
        "optim": {"lr": 5e-3, "micro_batch": 4, "epochs": 2, "schedule": "constant"},
        "checkpoint": {"every": 1},
    })
    return tmp_path, cfg


def _resume(cfg: Path, run: Path) -> None:
    train(load_train_config(cfg), run, resume=True, progress=False, log=lambda m: None)


EDITS = {
    "data.train: train.jsonl changed": lambda w: (w / "train.jsonl").write_text(
        (w / "train.jsonl").read_text().replace("return x", "return 2 * x", 1)),
    "data.train: train.jsonl changed ": lambda w: write_jsonl(w / "train.jsonl", toy_rows(9)),  # a row added
    "teacher.model: model.safetensors changed": lambda w: save_model_dir(w / "teacher", seed=7, hidden=32),
    "student.path: model.safetensors changed": lambda w: save_model_dir(w / "student", seed=8, hidden=16),
    "student.path: chat_template.jinja changed": lambda w: (w / "student" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    "student.path: tokenizer_config.json changed": lambda w: (w / "student" / "tokenizer_config.json").write_text(
        json.dumps({**json.loads((w / "student" / "tokenizer_config.json").read_text()), "model_max_length": 7})),
}


@pytest.mark.parametrize("expected", list(EDITS))
def test_resume_refuses_each_changed_input_naming_it(world, expected):
    w, cfg = world
    run = w / "run"
    train(load_train_config(cfg), run, progress=False, log=lambda m: None)
    assert json.loads((run / "inputs.json").read_text()).keys() == {"data.train", "student.path", "teacher.model"}
    EDITS[expected](w)
    with pytest.raises(TrainingError, match="inputs differ") as e:
        _resume(cfg, run)
    assert expected.strip() in str(e.value)


def test_killed_run_on_edited_data_is_refused_by_the_command_and_resumes_once_restored(world):
    w, cfg = world
    run = w / "run"
    cmd = [sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, FAULT_ENV: "after_checkpoint:2"}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-500:]
    original = (w / "train.jsonl").read_bytes()
    write_jsonl(w / "train.jsonl", toy_rows(8, seed=3))
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert proc.returncode == 1 and "data.train: train.jsonl changed" in proc.stderr, proc.stderr[-800:]
    assert proc.stderr.count("\n") <= 3  # one clear message, no traceback
    (w / "train.jsonl").write_bytes(original)
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-800:]


def test_identity_ignores_what_cannot_change_a_result(tmp_path):
    d = save_model_dir(tmp_path / "m")
    before = path_identity(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "transformers_version": "0.0.1"}, indent=4))
    (d / "README.md").write_text("notes")
    assert path_identity(d)["sha256"] == before["sha256"]
    (d / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.3}))
    assert changed_inputs({"m": before}, {"m": path_identity(d)}) == ["m: generation_config.json changed"]
    (d / "chat_template.jinja").unlink()
    assert changed_inputs({"m": before}, {"m": path_identity(d)}) == [
        "m: generation_config.json changed, chat_template.jinja removed"]


def test_run_inputs_cover_every_path_a_config_reads(world):
    w, cfg = world
    shutil.copy(w / "train.jsonl", w / "val.jsonl")
    c = load_train_config(cfg, [f"data.validation={w / 'val.jsonl'}"])
    assert set(run_inputs(c, served_identity)) == {"data.train", "data.validation", "student.path", "teacher.model"}


def test_a_cache_is_identified_by_its_manifest_and_tokenizer_not_by_reading_its_shards(tmp_path):
    from kdkit.util.identity import cache_identity

    (tmp_path / "manifest.json").write_text('{"shards": []}')
    (tmp_path / "shard-00000.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "teacher_tokenizer").mkdir()
    (tmp_path / "teacher_tokenizer" / "tokenizer.json").write_text("{}")
    before = cache_identity(tmp_path)
    assert sorted(before["files"]) == ["manifest.json", "teacher_tokenizer/tokenizer.json"]
    (tmp_path / "shard-00000.safetensors").write_bytes(b"y" * 100)  # checked against the manifest when read
    assert cache_identity(tmp_path) == before
    (tmp_path / "teacher_tokenizer" / "tokenizer.json").write_text('{"model": 1}')
    assert changed_inputs({"teacher.cache": before}, {"teacher.cache": cache_identity(tmp_path)}) == [
        "teacher.cache: teacher_tokenizer/tokenizer.json changed"]
