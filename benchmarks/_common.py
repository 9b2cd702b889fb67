"""Shared set-up for the benchmarks: the tiny world's data and models in a temp directory."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def machine() -> dict:
    import os

    import torch

    return {"machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu"}


def world_files(tmp: Path, rows: int = 512, seed: int = 0) -> dict[str, Path]:
    from kdkit.demo.world import make_world, training_rows

    w = make_world(seed)
    p = tmp / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in training_rows(w.train[:rows])))
    return {"train": p}
