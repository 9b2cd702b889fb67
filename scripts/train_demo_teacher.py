"""Train the tiny world's teacher: a character-level Llama trained by `kdkit train` (plain SFT).

    python scripts/train_demo_teacher.py [--seed 0] [--out src/kdkit/demo/assets/teacher]

Seeded and CPU-only; writes the model (safetensors), its tokenizer, and CARD.md with
the size, data, seed, pass rates and the command that made it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from kdkit.demo.assets_build import TEACHER_SHAPE, fresh_model_dir
from kdkit.demo.world import make_world, write_world
from kdkit.evaluate.passrate import GenerationSettings, evaluate_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/kdkit/demo/assets/teacher"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = make_world(args.seed)
        n_train = len(world.train)
        paths = write_world(world, tmp / "world")
        init = fresh_model_dir(tmp / "init", TEACHER_SHAPE, seed=args.seed)
        cfg = {
            "student": {"path": str(init)},
            "data": {"train": str(paths["train"]), "max_length": 256, "shuffle_seed": args.seed},
            "objective": {"ce_coef": 1.0, "kd_weight": 0.0},
            "optim": {"lr": args.lr, "micro_batch": 32, "epochs": args.epochs, "warmup_steps": 50,
                      "schedule": "cosine", "weight_decay": 0.01, "seed": args.seed},
            "checkpoint": {"every": 0},
            "logging": {"every": 10},
        }
        (tmp / "teacher.yaml").write_text(yaml.safe_dump(cfg))
        from kdkit.config.load import load_train_config
        from kdkit.train import merge, train

        res = train(load_train_config(tmp / "teacher.yaml"), tmp / "run", log=print)
        out = Path(args.out)
        merge(tmp / "run", tmp / "pack")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp / "pack", out)
        (out / "kdkit_pack.json").unlink(missing_ok=True)
        epochs = [json.loads(x) for x in (tmp / "run" / "epochs.jsonl").read_text().splitlines()]
        rates = {}
        for split in ("anchors", "holdout"):
            _, summary, _ = evaluate_model(out, paths[split], settings=GenerationSettings(max_new_tokens=96),
                                           progress=False)
            rates[split] = summary
            print(split, summary.line())
    n_params = sum(p.numel() for p in __import__("kdkit.models.load", fromlist=["x"]).load_causal_lm(out).parameters())
    card = f"""# kdkit demo teacher

A character-level Llama-architecture model that writes short Python functions from English
docstrings: the teacher of the bundled tiny world (`kdkit demo`).

| field | value |
|---|---|
| parameters | {n_params:,} |
| shape | hidden {TEACHER_SHAPE['hidden']}, layers {TEACHER_SHAPE['layers']}, heads {TEACHER_SHAPE['heads']}, \
vocab 101 (printable ASCII) |
| data | `kdkit.demo.world.make_world(seed={args.seed})` train split: {n_train} tasks |
| training | `kdkit train`, plain SFT, {args.epochs} epochs, lr {args.lr}, batch 32, seed {args.seed} |
| final train loss | {epochs[-1]['train_loss']:.4f} |
| anchors (greedy) | {rates['anchors'].line()} |
| holdout (greedy) | {rates['holdout'].line()} |
| wall time | {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} CPU threads, torch {torch.__version__} |

Made by: `python scripts/train_demo_teacher.py --seed {args.seed} --epochs {args.epochs} --lr {args.lr}`
(steps: {res['steps']}).
"""
    (out / "CARD.md").write_text(card)
    print(card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
