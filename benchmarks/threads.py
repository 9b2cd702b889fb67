"""Threads on a shared machine: kdkit's thread settings (kdkit.util.threads) against torch's defaults.

    python benchmarks/threads.py [--repeats 3] [--demo] [--tests tests/test_train.py]

Each workload runs in a fresh process with KDKIT_THREADS=torch (OpenMP's and torch's defaults: a thread per
core, spinning while it waits) and with kdkit's default (sleeping waiters, the process's share of its
cores), idle and beside a CPU-bound competitor (a second copy of the same workload, started with the same
settings, or --spinner: one busy Python loop). Workloads: a tiny `kdkit train` (LoRA, demo-sized student,
40 steps); with --demo, `kdkit demo`; with --tests, `pytest -q` of the given files. Reports wall seconds,
the arms interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, world_files  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _train_cmd(tmp: Path) -> list[str]:
    from kdkit.demo.assets_build import STUDENT_SHAPE, fresh_model_dir

    data = world_files(tmp, 320)["train"]
    student = fresh_model_dir(tmp / "student", STUDENT_SHAPE, seed=1)
    cfg = {"student": {"path": str(student), "lora": {"r": 8, "alpha": 16}},
           "data": {"train": str(data), "max_length": 256}, "objective": {"kd_weight": 0.0},
           "optim": {"lr": 3e-3, "micro_batch": 8, "max_steps": 40, "epochs": 10}, "checkpoint": {"every": 0}}
    (tmp / "train.yaml").write_text(yaml.safe_dump(cfg))
    return [sys.executable, "-m", "kdkit", "train", str(tmp / "train.yaml"), "--no-progress", "--out"]


def _timed(cmd: list[str], env: dict[str, str], competitor: list[str] | None, spinner: bool) -> float:
    other = None
    if spinner:
        other = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    elif competitor is not None:
        other = subprocess.Popen(competitor, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    dt = time.perf_counter() - t0
    if other is not None:
        other.kill() if spinner else other.wait()
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo", action="store_true")
    ap.add_argument("--tests", nargs="*", default=[])
    ap.add_argument("--spinner", action="store_true", help="the competitor is a busy loop, not a second copy")
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = _train_cmd(tmp)
        work = {"train": lambda i: [*train, str(tmp / f"run{i}")]}
        if args.demo:
            work["demo"] = lambda i: [sys.executable, "-m", "kdkit", "demo", "--no-progress", "--out", str(tmp / f"d{i}")]
        if args.tests:
            work["tests"] = lambda i: [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests]
        n = 0
        for name, make in work.items():
            for _ in range(args.repeats if name == "train" else 1):
                for scenario in ("idle", "busy"):
                    for arm in ("torch", "auto"):  # interleaved
                        env = {**os.environ, "KDKIT_THREADS": arm}
                        env.pop("OMP_NUM_THREADS", None)
                        env.pop("OMP_WAIT_POLICY", None)
                        n += 1
                        rival = make(10_000 + n) if scenario == "busy" and not args.spinner else None
                        dt = _timed(make(n), env, rival, scenario == "busy" and args.spinner)
                        results.setdefault(f"{name} {scenario}", {}).setdefault(arm, []).append(round(dt, 2))
    out = {"benchmark": "threads", "competitor": "spinner" if args.spinner else "a second copy",
           "results": results, **machine()}
    print(json.dumps(out))
    print(f"\n| workload | torch's defaults s | kdkit's threads s | ratio |  (competitor: {out['competitor']})")
    print("|---|---|---|---|")
    for key, arms in results.items():
        a, b = statistics.median(arms["torch"]), statistics.median(arms["auto"])
        print(f"| {key} | {a:.1f} ({', '.join(map(str, arms['torch']))}) | {b:.1f} ({', '.join(map(str, arms['auto']))}) "
              f"| {a / b:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
