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


def reset_peak_rss() -> float:
    """Restart this process's RSS high-water mark at its current RSS (Linux: /proc/self/clear_refs) and return
    that RSS in MB. (getrusage's ru_maxrss cannot be restarted, and a process started by a large parent
    inherits the parent's.)"""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The RSS high-water mark (MB) since :func:`reset_peak_rss`."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def world_files(tmp: Path, rows: int = 512, seed: int = 0) -> dict[str, Path]:
    from kdkit.demo.world import make_world, training_rows

    w = make_world(seed)
    p = tmp / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in training_rows(w.train[:rows])))
    return {"train": p}
