"""CUDA-only checks (skipped on a machine without a GPU; `scripts/gpu_check.sh` runs them where one is lent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdkit.config.load import load_train_config
from kdkit.train import train
from tests.helpers import save_model_dir, toy_rows, write_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def _world(root: Path) -> None:
    save_model_dir(root / "teacher", seed=1, hidden=32)
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(16))


def _losses(root: Path, out: Path, **optim) -> list[float]:
    cfg = {"student": {"path": str(root / "student"), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}},
           "teacher": {"model": str(root / "teacher")}, "data": {"train": str(root / "train.jsonl"), "max_length": 96},
           "optim": {"lr": 5e-3, "micro_batch": 4, "epochs": 1, "schedule": "constant", **optim},
           "checkpoint": {"every": 0}}
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    train(load_train_config(out.parent / f"{out.name}.yaml"), out, progress=False, log=lambda m: None)
    return [json.loads(x)["total_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_bf16_mixed_on_the_gpu_tracks_fp32(tmp_path):
    _world(tmp_path)
    fp32 = _losses(tmp_path, tmp_path / "fp32")
    mixed = _losses(tmp_path, tmp_path / "mixed", precision="bf16-mixed")
    assert mixed == pytest.approx(fp32, rel=2e-2)


def test_checkpoints_on_the_gpu_hold_its_rng_state(tmp_path):
    from kdkit.models.checkpoint import rng_states

    states = rng_states()
    assert [k for k in states if k.startswith("cuda.")] == [f"cuda.{i}" for i in range(torch.cuda.device_count())]
