"""Training-step time: offline KD (teacher cache) and online KD (live teacher) against plain SFT.

    python benchmarks/step.py [--rows 256] [--steps 24]
    python benchmarks/step.py --teacher /tmp/smollm2/teacher --student /tmp/smollm2/teacher \
        --data /tmp/smollm2/rows_messages.jsonl --micro-batch 4 --steps 12     # SmolLM2-sized

Same student (the demo student shape, full fine-tuning), same rows, batch and
steps; only the teacher source differs. Reports the median seconds per optimizer
step (first two steps dropped) and the ratios. Targets: offline KD / SFT <= 1.10;
online KD / SFT is compared with the FLOP estimate 1 + N_teacher / (3·N_student)
(a teacher forward costs ~1/3 of a student forward + backward per parameter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, world_files  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--teacher", help="teacher model directory (default: the demo teacher)")
    ap.add_argument("--student", help="student model directory, fully fine-tuned (default: a fresh demo student)")
    ap.add_argument("--data", help="training rows JSONL (default: the tiny world's)")
    ap.add_argument("--rounds", type=int, default=1, help="run the three this many times, interleaved")
    args = ap.parse_args()

    from kdkit.config.load import load_train_config
    from kdkit.demo.assets_build import STUDENT_SHAPE, fresh_model_dir
    from kdkit.demo.run import TEACHER_DIR
    from kdkit.models.load import load_causal_lm
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
    from kdkit.train import count_parameters, train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else world_files(tmp, args.rows)["train"]
        student = Path(args.student) if args.student else fresh_model_dir(tmp / "student", STUDENT_SHAPE, seed=1)
        teacher_dir = Path(args.teacher) if args.teacher else TEACHER_DIR
        precompute(teacher_dir, data, tmp / "cache", PrecomputeSettings(top_k=64, max_length=256), progress=False,
                   log=lambda m: None)
        rounds: dict[str, list[float]] = {"sft": [], "offline_kd": [], "online_kd": []}
        runs = [("sft", None), ("offline_kd", {"cache": str(tmp / "cache")}), ("online_kd", {"model": str(teacher_dir)})]
        for i, (name, teacher) in enumerate(runs * args.rounds):  # interleaved: drift hits all three alike
            cfg = {"student": {"path": str(student)}, "data": {"train": str(data), "max_length": 256},
                   "objective": {"kd_weight": 1.0 if teacher else 0.0},
                   "optim": {"lr": 1e-3, "micro_batch": args.micro_batch, "max_steps": args.steps, "epochs": 100},
                   "checkpoint": {"every": 0}}
            if teacher:
                cfg["teacher"] = teacher
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
            train(load_train_config(tmp / f"{name}.yaml"), tmp / f"{name}-{i}", progress=False, log=lambda m: None)
            steps = [json.loads(x) for x in (tmp / f"{name}-{i}" / "metrics.jsonl").read_text().splitlines()][2:]
            rounds[name].append(statistics.median(s["step_time_s"] for s in steps))
        per_step = {name: statistics.median(v) for name, v in rounds.items()}  # each one's median round
        n_t = count_parameters(load_causal_lm(teacher_dir))
        n_s = count_parameters(load_causal_lm(student))
    res = {"benchmark": "step", "sft_s": round(per_step["sft"], 5), "offline_kd_s": round(per_step["offline_kd"], 5),
           "online_kd_s": round(per_step["online_kd"], 5),
           "offline_ratio": round(per_step["offline_kd"] / per_step["sft"], 3),
           "online_ratio": round(per_step["online_kd"] / per_step["sft"], 3),
           "online_flop_estimate": round(1 + n_t / (3 * n_s), 3), "teacher_params": n_t, "student_params": n_s,
           "rounds": {k: [round(x, 4) for x in v] for k, v in rounds.items()}, **machine()}
    print(json.dumps(res))
    print("\n| SFT s/step | offline KD s/step | online KD s/step | offline/SFT (target <= 1.10) | online/SFT | "
          "FLOP estimate |")
    print("|---|---|---|---|---|---|")
    print(f"| {res['sft_s']} | {res['offline_kd_s']} | {res['online_kd_s']} | {res['offline_ratio']} | "
          f"{res['online_ratio']} | {res['online_flop_estimate']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
