"""kdkit train (online and offline KD) side by side with TRL's GKD trainer, same teacher/student/data.

    pip install -e '.[bench]'        # TRL (GKDTrainer lives in trl.experimental.gkd in TRL 1.x)
    python benchmarks/peers.py [--rows 256] [--steps 24] [--batch 16]

Off-policy, TRL runs with lmbda = 0 (no student generation) and beta = 0 (forward KL), the closest
equivalent of kdkit's kl_fwd + CE. On-policy (``trl_gkd_onpolicy`` vs ``kdkit_onpolicy``), both run
every step on-policy (TRL lmbda = 1, kdkit objective.on_policy.fraction = 1) with the generalised JSD at
beta = 0.5, sampling at temperature 1 with at most --new-tokens tokens per completion. Data: the tiny
world's rows as chat messages (the char tokenizer has a chat template). Each trainer runs in a fresh
subprocess; reported: median seconds per optimizer step (first two dropped) and the growth of max RSS
during training.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

METHODS = ("trl_gkd", "kdkit_online", "kdkit_offline", "trl_gkd_onpolicy", "kdkit_onpolicy")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rows(n: int) -> list[dict]:
    from kdkit.demo.world import make_world

    return [{"messages": [{"role": "user", "content": t["prompt"]},
                          {"role": "assistant", "content": t["canonical_solution"]}]}
            for t in make_world(0).train[:n]]


def run_trl(tmp: Path, student: Path, rows: list[dict], steps: int, batch: int, new_tokens: int | None) -> list[float]:
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdkit.demo.run import TEACHER_DIR
    from kdkit.models import load_tokenizer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    tok = load_tokenizer(student)
    mode = {"lmbda": 1.0, "beta": 0.5, "max_new_tokens": new_tokens} if new_tokens else {"lmbda": 0.0, "beta": 0.0}
    cfg = GKDConfig(output_dir=str(tmp / "trl"), **mode, temperature=1.0, max_steps=steps,
                    per_device_train_batch_size=batch, learning_rate=1e-3, report_to=[], logging_steps=50,
                    save_strategy="no", use_cpu=True, max_length=256, disable_dropout=True, seed=0)
    trainer = GKDTrainer(model=AutoModelForCausalLM.from_pretrained(str(student)),
                         teacher_model=AutoModelForCausalLM.from_pretrained(str(TEACHER_DIR)), args=cfg,
                         train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Timer()])
    trainer.train()
    return times


def run_kdkit(tmp: Path, student: Path, rows: list[dict], steps: int, batch: int, offline: bool,
              new_tokens: int | None) -> list[float]:
    from kdkit.cache.precompute import PrecomputeSettings, precompute
    from kdkit.config import load_train_config
    from kdkit.demo.run import TEACHER_DIR
    from kdkit.train import train

    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = {"model": str(TEACHER_DIR)}
    if offline:
        precompute(TEACHER_DIR, data, tmp / "cache", PrecomputeSettings(top_k=64, max_length=256), progress=False,
                   log=lambda m: None)
        teacher = {"cache": str(tmp / "cache")}
    cfg = {"student": {"path": str(student)}, "teacher": teacher, "data": {"train": str(data), "max_length": 256},
           "objective": {"kd_weight": 1.0, **({"kd": {"kind": "jsd", "beta": 0.5}, "on_policy": {
               "fraction": 1.0, "max_new_tokens": new_tokens, "temperature": 1.0}} if new_tokens else {})},
           "checkpoint": {"every": 0},
           "optim": {"lr": 1e-3, "micro_batch": batch, "max_steps": steps, "epochs": 100, "schedule": "constant"}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train(load_train_config(tmp / "cfg.yaml"), tmp / "run", progress=False, log=lambda m: None)
    return [json.loads(x)["step_time_s"] for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


def one(method: str, rows_n: int, steps: int, batch: int, new_tokens: int) -> dict:
    from kdkit.demo.assets_build import STUDENT_SHAPE, fresh_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student = fresh_model_dir(tmp / "student", STUDENT_SHAPE, seed=1)
        rows = _rows(rows_n)
        base = _rss_mb()
        on = new_tokens if method.endswith("_onpolicy") else None
        if method.startswith("trl_gkd"):
            times = run_trl(tmp, student, rows, steps, batch, on)
        else:
            times = run_kdkit(tmp, student, rows, steps, batch, offline=method == "kdkit_offline", new_tokens=on)
        peak = _rss_mb() - base
    return {"method": method, "s_per_step": round(statistics.median(times[2:]), 4), "steps": len(times),
            "peak_rss_growth_mb": round(peak, 1), "batch": batch}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64, help="on-policy: the most tokens per completion")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.rows, args.steps, args.batch, args.new_tokens)))
        return 0
    res = []
    for m in args.methods:
        out = subprocess.run([sys.executable, __file__, "--one", m, "--rows", str(args.rows), "--steps",
                              str(args.steps), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        res.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps({**res[-1], **machine()}))
    trl = {r["method"].endswith("_onpolicy"): r["s_per_step"] for r in res if r["method"].startswith("trl_gkd")}
    print("\n| trainer | s/step | vs TRL GKD (same policy) | peak RSS growth MB |")
    print("|---|---|---|---|")
    for r in res:
        ref = trl.get(r["method"].endswith("_onpolicy"))
        ratio = f"{r['s_per_step'] / ref:.2f}" if ref else "–"
        print(f"| {r['method']} | {r['s_per_step']} | {ratio} | {r['peak_rss_growth_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
