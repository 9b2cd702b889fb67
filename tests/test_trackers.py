"""Experiment trackers (logging.report_to) through Accelerate: each one, in its offline mode, is given the
same per-step and per-epoch figures as metrics.jsonl/epochs.jsonl and the resolved config."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from kdkit.config.load import load_train_config
from kdkit.train.trackers import flat_config
from kdkit.util.errors import KdkitError
from tests.helpers import read_jsonl, save_model_dir, toy_rows, write_config, write_jsonl

STEPS = 4


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One run logging to all four trackers (W&B offline, MLflow's local SQLite store in the run, trackio
    locally)."""
    root = tmp_path_factory.mktemp("trackers")
    student = save_model_dir(root / "student", seed=2, hidden=16)
    cfg = write_config(root, {
        "student": {"path": str(student)},
        "data": {"train": str(write_jsonl(root / "train.jsonl", toy_rows(8))),
                 "validation": str(write_jsonl(root / "val.jsonl", toy_rows(4, seed=9))), "max_length": 64},
        "objective": {"kd_weight": 0.0},
        "optim": {"lr": 5e-3, "micro_batch": 4, "max_steps": STEPS, "epochs": 2, "schedule": "constant"},
        "checkpoint": {"every": 0},
        "logging": {"report_to": ["tensorboard", "wandb", "mlflow", "trackio"]}})
    run = root / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(root / "trackio")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(run), "--no-progress"],
                          env=env, capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run, read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "epochs.jsonl")


def test_tensorboard_has_every_step_and_epoch_figure(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, metrics, epochs = tracked_run
    ev = EventAccumulator(str(run / "kdkit"))
    ev.Reload()
    got = [(s.step, s.value) for s in ev.Scalars("total_loss")]
    assert [s for s, _ in got] == [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [v for _, v in got] == pytest.approx([m["total_loss"] for m in metrics], rel=1e-6)
    val = [(s.step, s.value) for s in ev.Scalars("epoch/val_loss")]
    assert val == [(e["step"], pytest.approx(e["val_loss"], rel=1e-6)) for e in epochs] and len(val) == 2
    hparams = next(run.glob("kdkit/*/hparams.yml")).read_text()
    assert "optim.lr: 0.005" in hparams


def test_mlflow_store_in_the_run_has_every_figure_and_the_config(tracked_run):
    from mlflow.tracking import MlflowClient

    _, run, metrics, epochs = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "kdkit"]
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == "run"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, "total_loss"))
    assert hist == [(m["step"], pytest.approx(m["total_loss"], rel=1e-12)) for m in metrics]
    hist = sorted((m.step, m.value) for m in client.get_metric_history(mrun.info.run_id, "epoch/val_loss"))
    assert hist == [(e["step"], pytest.approx(e["val_loss"], rel=1e-12)) for e in epochs]
    assert mrun.data.params["optim.lr"] == "0.005" and mrun.data.params["objective.kd_weight"] == "0.0"


def _wandb_records(path):
    """The protobuf records of an offline W&B run file: a 7-byte header, then LevelDB's log format (32 KiB
    blocks; each fragment: crc32c, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    blob, pos, part, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(blob):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", blob[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if n == 0 and kind == 0:  # the block's padding
            pos += left
            continue
        part += blob[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def test_wandb_offline_run_has_every_figure_and_the_config(tracked_run):
    _, run, metrics, epochs = tracked_run
    (path,) = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    records = _wandb_records(path)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [m["step"] for m in metrics]
    assert [h["total_loss"] for h in history] == pytest.approx([m["total_loss"] for m in metrics], rel=1e-6)
    assert [h["epoch/val_loss"] for h in history if "epoch/val_loss" in h] == pytest.approx(
        [e["val_loss"] for e in epochs], rel=1e-6)
    (config,) = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    assert {i.key: json.loads(i.value_json) for i in config.update}["optim.lr"] == 0.005


def test_trackio_local_database_has_every_step(tracked_run):
    root, _, metrics, _ = tracked_run
    db = root / "trackio" / "kdkit.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT step, metrics FROM metrics ORDER BY step").fetchall()
    per_step = {}
    for step, blob in rows:
        per_step.setdefault(step, {}).update(json.loads(blob))
    assert [per_step[m["step"]]["total_loss"] for m in metrics] == pytest.approx(
        [m["total_loss"] for m in metrics], rel=1e-12)


def test_a_tracker_that_is_not_installed_is_refused_at_validate(tmp_path, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from kdkit.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    student = save_model_dir(tmp_path / "student", seed=2, hidden=16)
    cfg = write_config(tmp_path, {"student": {"path": str(student)},
                                  "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", toy_rows(4)))},
                                  "objective": {"kd_weight": 0.0}, "logging": {"report_to": ["tensorboard", "wandb"]}})
    res = CliRunner().invoke(app, ["validate", str(cfg)])
    assert res.exit_code != 0
    assert "logging.report_to: wandb is asked for but wandb is not installed (pip install wandb)" in res.output


def test_report_to_refuses_an_unknown_tracker_and_a_repeat(tmp_path):
    base = {"student": {"path": "s"}, "data": {"train": "t.jsonl"}}
    for bad, msg in (([ "comet"], "logging.report_to"), (["wandb", "wandb"], "names a tracker twice")):
        with pytest.raises(KdkitError, match=msg):
            load_train_config(write_config(tmp_path, {**base, "logging": {"report_to": bad}}))
    with pytest.raises(KdkitError, match="logging.project: logging.report_to names no tracker"):
        load_train_config(write_config(tmp_path, {**base, "logging": {"project": "mine"}}))
    cfg = load_train_config(write_config(tmp_path, {**base, "logging": {"tensorboard": True, "report_to": ["wandb"]}}))
    assert cfg.logging.report_to == ["tensorboard", "wandb"]


def test_the_config_is_flattened_to_scalars():
    assert flat_config({"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "teacher": None, "a": {"b": {"c": True}},
                        "empty": {}}) == {"optim.lr": 1e-3, "optim.betas": "[0.9, 0.99]", "teacher": "null",
                                          "a.b.c": True, "empty": "{}"}
