"""Faults end in one clear line: a full disk or a read-only directory names the path and what to do
(exit code 2, no traceback), leaves nothing half-written, and a rerun continues from what was complete."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import save_model_dir, toy_rows, write_jsonl


def _mount(where: Path, opts: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({proc.stderr.strip()[:80]}): needs root")


@pytest.fixture
def disk(tmp_path):
    """A small tmpfs (a disk that fills up), remountable larger or read-only."""
    where = tmp_path / "disk"
    _mount(where, "size=40k")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _remount(where: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(where)], check=True)


def _kdkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdkit", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"})


def _one_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, proc.stderr[-2000:]
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_world")
    save_model_dir(root / "teacher", seed=1, hidden=32)
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(40))
    return root


def test_precompute_on_a_full_disk_says_so_and_a_rerun_with_room_gives_the_same_bytes(world, disk):
    args = ["precompute", "--teacher", str(world / "teacher"), "--data", str(world / "train.jsonl"), "--top-k", "16",
            "--shard-rows", "8", "--no-progress"]
    err = _one_line(_kdkit(*args, "--out", str(disk / "cache")))
    assert str(disk / "cache") in err and "No space left on device" in err and "rerun the same command" in err
    assert not [p for p in (disk / "cache").iterdir() if ".tmp" in p.name]  # nothing half-written left
    _remount(disk, "size=16m")
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

    settings = PrecomputeSettings(top_k=16, shard_rows=8)  # the same capture, in this process: same bytes
    for out in (disk / "cache", world / "ref"):
        precompute(world / "teacher", world / "train.jsonl", out, settings, progress=False, log=lambda m: None)
    ours = {p.name: p.read_bytes() for p in sorted((disk / "cache").iterdir()) if not p.name.startswith(".")}
    ref = {p.name: p.read_bytes() for p in sorted((world / "ref").iterdir()) if not p.name.startswith(".")}
    assert ours == ref


def test_training_on_a_full_disk_stops_with_one_line_and_resumes_when_there_is_room(world, disk, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"student": {"path": str(world / "student")},
                                   "data": {"train": str(world / "train.jsonl"), "max_length": 64},
                                   "optim": {"lr": 5e-3, "micro_batch": 4, "epochs": 1},
                                   "checkpoint": {"every": 1, "keep": 50}}))
    err = _one_line(_kdkit("train", str(cfg), "--out", str(disk / "run"), "--no-progress"))
    assert str(disk / "run") in err and "No space left on device" in err
    ck = disk / "run" / "checkpoints"
    assert not list(ck.glob(".tmp-*")) if ck.is_dir() else True
    _remount(disk, "size=64m")
    proc = _kdkit("train", str(cfg), "--out", str(disk / "run"), "--no-progress", "--resume")
    assert proc.returncode == 0 and "trained 10 steps" in proc.stdout, proc.stderr[-1500:]


def test_a_read_only_output_directory_is_one_line(world, disk, tmp_path):
    _remount(disk, "ro")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"student": {"path": str(world / "student")},
                                   "data": {"train": str(world / "train.jsonl"), "max_length": 64},
                                   "optim": {"epochs": 1}, "checkpoint": {"every": 0}}))
    err = _one_line(_kdkit("train", str(cfg), "--out", str(disk / "run"), "--no-progress"))
    assert "Read-only file system" in err and "choose a writable output directory" in err and str(disk) in err
    from typer.testing import CliRunner

    from kdkit.cli import app

    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def f(x):\n"}])
    for args, where in ((["generate", "--model", str(world / "teacher"), "--data", str(tmp_path / "p.jsonl"),
                          "--out", str(disk / "rows.jsonl"), "--no-progress"], disk),
                        (["precompute", "--teacher", str(world / "teacher"), "--data", str(world / "train.jsonl"),
                          "--out", str(disk / "cache"), "--no-progress"], disk / "cache")):
        res = CliRunner().invoke(app, args, terminal_width=400)  # the same command, in this process
        err = res.output.strip()
        assert res.exit_code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, res.output
        assert "Read-only file system" in err and str(where) in err


def test_a_refusal_every_rank_raises_is_printed_once_by_rank_0(tmp_path):
    from typer.testing import CliRunner

    from kdkit.cli import app
    from kdkit.models.sharding import check_supported
    from kdkit.util.errors import UsageError

    bad = tmp_path / "bad.yaml"
    bad.write_text("student:\n  path: x\nstudent:\n  path: y\n")
    said = {rank: CliRunner().invoke(app, ["validate", str(bad)], env={"RANK": rank}) for rank in ("0", "1")}
    assert said["0"].exit_code == said["1"].exit_code == 2
    assert "given twice" in said["0"].output and said["1"].output == ""

    class FSDP:  # an Accelerator whose run is sharded
        from accelerate.utils import DistributedType

        distributed_type = DistributedType.FSDP

    with pytest.raises(UsageError, match="not supported under FSDP") as e:
        check_supported({"probes": {"prompts": "p.jsonl"}}, FSDP())
    assert e.value.same_on_every_rank
