"""Time to quality: how many seconds each trainer needs for a student of a given validation KL, kdkit
against TRL, side by side on the same machine.

    pip install -e '.[bench]'      # TRL 1.16
    make vllm-env                  # the teacher's answers (and the served arm) through vLLM
    python benchmarks/time_to_quality.py --out ttq --teacher /tmp/kdkit-models/smollm2 [--rows kd-vs-ce]
                                         [--budget 150] [--seeds 2] [--arms ...]

Same teacher (SmolLM2-135M-Instruct), same student (`kdkit student init --layers 10`: 10 of its 30 decoder
layers, with its embeddings, norm and head), same rows: the KD-vs-CE example's, the teacher's greedy answers
to MBPP training prompts (--rows DIR reuses what `examples/smollm2_kd_vs_ce.py --out DIR` wrote; without it
they are made here the same way). The same optimiser where both sides have one: AdamW at --lr, 8 rows a step
(4 × 2 accumulated), a constant rate without warm-up (a time budget has no step count for a schedule to end
at), sequences of at most 768 tokens. Arms:

  trl_gkd                 TRL's GKDTrainer off-policy (lmbda 0), its defaults otherwise (generalised JSD at
                          beta 0.5, temperature 0.9). TRL 1.16's stable DistillationTrainer has no off-policy
                          mode: its rows are prompts that the student answers.
  trl_gkd_fwd             the same with beta 0 and temperature 1: forward KL at T = 1, kdkit's divergence
  trl_distill             TRL's DistillationTrainer at its defaults (on-policy, reverse KL, temperature 1,
                          gradient checkpointing), answers of at most --new-tokens tokens
  kdkit_cache             kdkit at its defaults (CE + forward KL) from the teacher's top-64 cache; the cache's
                          capture (`kdkit precompute`) is timed apart and reported beside
  kdkit_live              the same with the teacher in the training process
  kdkit_served            the same with the teacher served by vLLM (top-64 + tail), the server started before
                          the clock (a served teacher is already up); its process's memory is not counted
  kdkit_onpolicy_sampled  on-policy every step, sampled_kl_rev (the teacher's log-prob of each sampled token)
  kdkit_onpolicy_full     on-policy every step, reverse KL over the whole vocabulary, as trl_distill

Each arm runs in a fresh process for --budget seconds of wall clock, counted from before its models load. At
each of --marks evenly spaced marks, the first optimizer step that ends past the mark saves the student (the
saving is taken off the clock) and records when those weights were ready. One evaluator, the same code for
every arm, reads the saved students afterwards: validation KL(teacher ‖ student) over the whole vocabulary,
the reverse KL, and the CE of the teacher's answers, per answer token, beside the teacher in one process. Arms
are interleaved, seed after seed; a rerun skips the arm-seeds that finished.

Reported (out/summary.json, out/summary.md, out/time_to_quality.png): per arm the steps and validation KL at
the budget (mean over seeds), peak RSS of the arm's process, and the seconds it needs to reach the final
validation KL of TRL's trainer of the same policy and divergence (off-policy, trl_gkd included: trl_gkd_fwd;
on-policy: trl_distill): when its first saved student at or below that KL was ready (no interpolation between
saves, so the resolution is the marks' spacing); the speed-up is the seconds at which TRL's final student was
ready over the arm's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from _common import machine, peak_rss_mb, reset_peak_rss  # noqa: E402
from tests.vllm_server import stop_on_sigterm  # noqa: E402

ARMS = ("trl_gkd", "trl_gkd_fwd", "trl_distill", "kdkit_cache", "kdkit_live", "kdkit_served",
        "kdkit_onpolicy_sampled", "kdkit_onpolicy_full")
REFERENCE = {"trl_gkd": "trl_gkd_fwd", "trl_gkd_fwd": "trl_gkd_fwd", "kdkit_cache": "trl_gkd_fwd",
             "kdkit_live": "trl_gkd_fwd", "kdkit_served": "trl_gkd_fwd",
             "trl_distill": "trl_distill", "kdkit_onpolicy_sampled": "trl_distill",
             "kdkit_onpolicy_full": "trl_distill"}
MAX_LENGTH = 768
OWN = {"run.json", "result.json", "config.yaml", "run", "trl"}  # what one arm-seed's directory holds, marks aside


# ---------------------------------------------------------------- the inputs, made once


def prepare(args: argparse.Namespace) -> dict[str, str]:
    """Teacher, student, train and validation rows, the top-64 cache and the seconds its capture took."""
    data = args.out / "data"
    done = data / "inputs.json"
    if done.is_file():
        return json.loads(done.read_text())
    data.mkdir(parents=True, exist_ok=True)
    d = {"teacher": str(args.teacher.resolve())}
    if args.rows:
        args.rows = args.rows.resolve()
        d.update(student=str(args.rows / "student_10"), train=str(args.rows / "train_rows.jsonl"),
                 val=str(args.rows / "val_rows.jsonl"))
    else:
        from smollm2_kd_vs_ce import MBPP
        from smollm2_kd_vs_ce import prepare as kd_vs_ce_prepare

        ns = argparse.Namespace(out=data / "kd-vs-ce", teacher=args.teacher, layers=10, train_rows=300, val_rows=60,
                                tasks_n=0, max_new_tokens=192, top_k=64, mbpp=MBPP, local_generate=False,
                                vllm_python=str(ROOT / ".venv-vllm" / "bin" / "python"))
        ns.out.mkdir(parents=True, exist_ok=True)
        made = kd_vs_ce_prepare(ns)
        d.update(student=str(made["student"]), train=str(made["train"]), val=str(made["val"]))
    for key in ("student", "train", "val"):
        if not Path(d[key]).exists():
            sys.exit(f"{d[key]}: missing (--rows DIR: a directory `examples/smollm2_kd_vs_ce.py --out DIR` wrote)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdkit", "precompute", "--teacher", d["teacher"], "--data", d["train"],
                    "--out", str(data / "cache"), "--top-k", "64", "--max-length", str(MAX_LENGTH),
                    "--batch-size", "8", "--no-progress"], check=True)
    d.update(cache=str(data / "cache"), cache_seconds=round(time.perf_counter() - t0, 1))
    done.write_text(json.dumps(d, indent=1))
    return d


# ---------------------------------------------------------------- one arm, in its own process


class Budget(Exception):
    """The arm's wall-clock budget is spent: its last mark is saved."""


class Marks:
    """A clock from before the models load, and the students saved at its marks. ``after_step`` runs after
    every optimizer step (a global post-hook of torch.optim): past a mark it saves the model, past the budget it
    stops the run. Time spent saving is taken off the clock."""

    def __init__(self, out: Path, budget: float, n: int) -> None:
        self.out, self.budget = out, budget
        self.todo = [budget * (i + 1) / n for i in range(n)]
        self.t0, self.steps, self.model, self.saved = time.perf_counter(), 0, None, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def after_step(self, optimizer: object, *_: object) -> None:
        self.steps += 1
        t = self.elapsed()
        if not self.todo or t < self.todo[0]:
            return
        while self.todo and t >= self.todo[0]:
            self.todo.pop(0)
        pause = time.perf_counter()
        where = self.out / f"mark-{len(self.saved):02d}"
        self.model.save_pretrained(str(where), safe_serialization=True)
        self.saved.append({"seconds": round(t, 2), "step": self.steps, "dir": where.name})
        self.t0 += time.perf_counter() - pause
        if not self.todo:
            raise Budget


def trl_arm(arm: str, d: dict, args: argparse.Namespace, marks: Marks) -> None:
    """TRL's trainer for ``arm`` until the budget is spent."""
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from kdkit.models.load import load_tokenizer

    rows = [json.loads(x) for x in Path(d["train"]).read_text().splitlines() if x.strip()]
    tok = load_tokenizer(d["student"])
    student = AutoModelForCausalLM.from_pretrained(d["student"], dtype="float32")
    teacher = AutoModelForCausalLM.from_pretrained(d["teacher"], dtype="float32")
    marks.model = student
    common = dict(output_dir=str(marks.out / "trl"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=10**6,
                  report_to=[], save_strategy="no", logging_steps=10**6, use_cpu=not torch.cuda.is_available(),
                  bf16=False, seed=args.seed, disable_tqdm=True)
    if arm.startswith("trl_gkd"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        same_kl = {"beta": 0.0, "temperature": 1.0} if arm == "trl_gkd_fwd" else {}  # kdkit's divergence
        cfg = GKDConfig(**common, lmbda=0.0, max_length=MAX_LENGTH, **same_kl)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    else:
        from trl import DistillationConfig, DistillationTrainer

        tok.padding_side = "left"
        prompts = [{"prompt": r["messages"][:-1]} for r in rows]
        cfg = DistillationConfig(**common, max_completion_length=args.new_tokens)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg,
                                      train_dataset=Dataset.from_list(prompts), processing_class=tok)
    trainer.train()


def kdkit_config(arm: str, d: dict, args: argparse.Namespace, url: str | None) -> dict:
    """The kdkit run of ``arm``: the teacher as a cache, in the process or served; off- or on-policy."""
    teacher = {"kdkit_cache": {"cache": d["cache"]}, "kdkit_served": {"url": url, "top_k": 64}}.get(
        arm, {"model": d["teacher"]})
    objective: dict = {"ce_coef": 1.0, "kd_weight": 1.0}
    if arm.startswith("kdkit_onpolicy"):
        objective["on_policy"] = {"fraction": 1.0, "max_new_tokens": args.new_tokens, "temperature": 1.0,
                                  "seed": args.seed}
        if arm == "kdkit_onpolicy_sampled":
            objective["on_policy"]["loss"] = "sampled_kl_rev"
        else:
            objective["kd"] = {"kind": "kl_rev"}
    return {"student": {"path": d["student"]}, "teacher": teacher,
            "data": {"train": d["train"], "max_length": MAX_LENGTH}, "objective": objective,
            "checkpoint": {"every": 0}, "logging": {"every": 10**6},
            "optim": {"lr": args.lr, "micro_batch": 4, "grad_accum": 2, "epochs": 1000, "max_steps": 10**6,
                      "schedule": "constant", "warmup_steps": 0, "seed": args.seed}}


def kdkit_arm(arm: str, d: dict, args: argparse.Namespace, marks: Marks) -> None:
    """kdkit's trainer for ``arm`` until the budget is spent."""
    import yaml

    from kdkit.config.load import load_train_config
    from kdkit.train import train

    def keep_model(model: object, step: int) -> None:  # the model the marks save, as the first step sees it
        marks.model = model

    path = marks.out / "config.yaml"
    path.write_text(yaml.safe_dump(kdkit_config(arm, d, args, args.url)))
    train(load_train_config(path), marks.out / "run", progress=False, log=lambda m: None, grad_hooks=[keep_model])


def one(args: argparse.Namespace) -> None:
    """One arm and seed in this process: train until the budget, write run.json (marks, steps, peak RSS)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    d = json.loads((args.out / "data" / "inputs.json").read_text())
    out = args.out / "runs" / f"{args.one}_s{args.seed}"
    if out.exists():  # an earlier try of this arm-seed: removed only if everything in it is what one() writes
        foreign = [p.name for p in out.iterdir() if p.name not in OWN and not p.name.startswith("mark-")]
        if foreign:
            sys.exit(f"{out}: holds {', '.join(sorted(foreign))}, which this benchmark did not write; not removed")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    reset_peak_rss()
    marks = Marks(out, args.budget, args.marks)
    hook = register_optimizer_step_post_hook(marks.after_step)
    try:
        (trl_arm if args.one.startswith("trl_") else kdkit_arm)(args.one, d, args, marks)
    except Budget:
        pass
    else:
        sys.exit(f"{args.one}: training ended before the budget ({marks.elapsed():.0f} s of {args.budget:g} s)")
    finally:
        hook.remove()
    record = {"arm": args.one, "seed": args.seed, "budget_s": args.budget, "steps": marks.steps,
              "marks": marks.saved, "peak_rss_mb": round(peak_rss_mb(), 1), **machine()}
    (out / "run.json").write_text(json.dumps(record, indent=1))


# ---------------------------------------------------------------- the one evaluator


def val_examples(tok: object, rows: list[dict]) -> list[tuple[list[int], int]]:
    """Each validation row as (token ids, where the teacher's answer starts), through the chat template."""
    out = []
    for r in rows:
        prompt = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=True)
        full = tok.apply_chat_template(r["messages"], tokenize=True)
        prompt, full = list(getattr(prompt, "input_ids", prompt)), list(getattr(full, "input_ids", full))
        if full[:len(prompt)] != prompt:
            raise ValueError("the chat template does not extend the prompt with the answer")
        out.append((full[:MAX_LENGTH], len(prompt)))
    return out


def answer_scores(t_logits, s_logits, ids, start: int) -> dict[str, float]:
    """Sums over one row's answer tokens (positions start.. predicted from start-1..) of forward KL(t ‖ s),
    reverse KL(s ‖ t) and the student's CE of the tokens, over the whole vocabulary, in float32."""
    import torch

    lt = torch.log_softmax(t_logits[start - 1:-1].float(), -1)
    ls = torch.log_softmax(s_logits[start - 1:-1].float(), -1)
    target = torch.as_tensor(ids[start:], device=ls.device)
    return {"kl": float((lt.exp() * (lt - ls)).sum()), "kl_rev": float((ls.exp() * (ls - lt)).sum()),
            "ce": float(-ls.gather(-1, target[:, None]).sum()), "tokens": float(len(target))}


def evaluate(run: Path, d: dict) -> list[dict]:
    """Every saved student of ``run`` on the validation rows; the teacher is run once per row."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdkit.models.load import load_tokenizer

    record = json.loads((run / "run.json").read_text())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tokenizer(d["teacher"])
    examples = val_examples(tok, [json.loads(x) for x in Path(d["val"]).read_text().splitlines() if x.strip()])
    points = [{"seconds": 0.0, "step": 0, "dir": d["student"]}] + record["marks"]
    models = [AutoModelForCausalLM.from_pretrained(str(run / p["dir"]), dtype="float32").to(dev).eval()
              for p in points]
    teacher = AutoModelForCausalLM.from_pretrained(d["teacher"], dtype="float32").to(dev).eval()
    sums = [dict.fromkeys(("kl", "kl_rev", "ce", "tokens"), 0.0) for _ in points]
    with torch.no_grad():
        for ids, start in examples:
            x = torch.tensor([ids], device=dev)
            t_logits = teacher(x).logits[0]
            for s, m in zip(sums, models, strict=True):
                for k, v in answer_scores(t_logits, m(x).logits[0], ids, start).items():
                    s[k] += v
    return [{"seconds": p["seconds"], "step": p["step"], "val_kl": s["kl"] / s["tokens"],
             "val_kl_rev": s["kl_rev"] / s["tokens"], "val_ce": s["ce"] / s["tokens"]}
            for p, s in zip(points, sums, strict=True)]


# ---------------------------------------------------------------- the runs, interleaved, and the summary


def mean_curve(records: list[dict]) -> list[dict]:
    """An arm's curve averaged over seeds, mark by mark (every seed saves the same number of marks)."""
    n = min(len(r["curve"]) for r in records)
    return [{k: statistics.fmean(r["curve"][i][k] for r in records) for k in ("seconds", "val_kl", "val_kl_rev",
                                                                                "val_ce")} for i in range(n)]


def seconds_to(curve: list[dict], target: float) -> float | None:
    """When the first saved student at or below ``target`` validation KL was ready; None if none is. No
    interpolation: between two saves a run has only the earlier student (and before the first, its loading)."""
    return next((p["seconds"] for p in curve if p["val_kl"] <= target), None)


def summarize(runs: dict[str, list[dict]], d: dict) -> dict:
    """Per arm over seeds: steps, quality at the budget, peak RSS, seconds to the reference's final KL."""
    curves = {arm: mean_curve(rs) for arm, rs in runs.items() if rs}
    rows = []
    for arm, rs in runs.items():
        if not rs:
            continue
        ref = REFERENCE[arm]
        target = curves[ref][-1]["val_kl"] if ref in curves else None
        ref_s = curves[ref][-1]["seconds"] if ref in curves else None  # when its final student was ready
        own = seconds_to(curves[arm], target) if target is not None else None
        end = curves[arm][-1]
        rows.append({"arm": arm, "reference": ref, "seeds": len(rs),
                     "steps": statistics.fmean(r["steps"] for r in rs), "seconds": end["seconds"],
                     "val_kl": end["val_kl"], "val_kl_seeds": [r["curve"][-1]["val_kl"] for r in rs],
                     "val_kl_rev": end["val_kl_rev"], "val_ce": end["val_ce"],
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "target_kl": target,
                     "seconds_to_target": own, "reference_seconds": ref_s,
                     "speedup": ref_s / own if own and ref_s else None})
    return {"rows": rows, "curves": curves, "cache_seconds": d["cache_seconds"],
            "start": {k: curves[next(iter(curves))][0][k] for k in ("val_kl", "val_ce")} if curves else None}


def table(s: dict) -> str:
    """The summary as a markdown table."""
    out = ["| arm | seeds | steps in budget | s/step | val KL at budget (seeds) | val CE | reverse KL | peak RSS MB "
           "| s to reach the reference's final KL | speed-up vs reference |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        to = "—" if r["target_kl"] is None else "(the reference)" if r["arm"] == r["reference"] else (
            "not reached" if r["seconds_to_target"] is None else
            "at the start" if r["seconds_to_target"] == 0 else f"{r['seconds_to_target']:.0f}")
        if r["arm"] == "kdkit_cache" and r["seconds_to_target"] is not None:
            to += f" (+{s['cache_seconds']:.0f} capture)"
        speed = "—" if r["arm"] == r["reference"] else (f"{r['speedup']:.2f}×" if r["speedup"] else "—")
        seeds = ", ".join(f"{x:.3f}" for x in r["val_kl_seeds"])
        out.append(f"| {r['arm']} | {r['seeds']} | {r['steps']:.0f} | {r['seconds'] / r['steps']:.2f} | "
                   f"{r['val_kl']:.3f} ({seeds}) | {r['val_ce']:.3f} | {r['val_kl_rev']:.3f} | {r['peak_rss_mb']:.0f} "
                   f"| {to} | {speed} |")
    return "\n".join(out)


def plot(s: dict, runs: dict[str, list[dict]], path: Path) -> None:
    """Validation KL against seconds (mean over seeds, each seed faint), and at the budget against peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (arm, curve) in enumerate(s["curves"].items()):
        color = f"C{i}"
        for r in runs[arm]:
            a.plot([p["seconds"] for p in r["curve"]], [p["val_kl"] for p in r["curve"]], color=color, alpha=0.25)
        a.plot([p["seconds"] for p in curve], [p["val_kl"] for p in curve], "o-", color=color, label=arm, ms=3)
        row = next(r for r in s["rows"] if r["arm"] == arm)
        b.scatter(row["peak_rss_mb"], row["val_kl"], color=color, label=arm)
    a.set(xlabel="seconds (wall clock, from model loading)", ylabel="validation KL(teacher ‖ student), nats/token",
          yscale="log", title="quality against time")
    b.set(xlabel="peak RSS of the training process, MB", ylabel="validation KL at the budget",
          title="quality against memory")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_arm(arm: str, seed: int, args: argparse.Namespace, d: dict) -> dict:
    """One arm-seed in a fresh process (a vLLM server of the teacher first for the served arm), then the
    evaluator in another; the saved students are deleted once scored."""
    run = args.out / "runs" / f"{arm}_s{seed}"
    if (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    cmd = [sys.executable, __file__, "--one", arm, "--seed", str(seed), "--out", str(args.out), "--budget",
           str(args.budget), "--marks", str(args.marks), "--lr", str(args.lr), "--new-tokens", str(args.new_tokens)]
    server = None
    if arm == "kdkit_served":
        from tests.vllm_server import VllmServer

        (args.out / "runs").mkdir(parents=True, exist_ok=True)
        server = VllmServer(Path(d["teacher"]), args.out / "runs" / "vllm.log").start()
        cmd += ["--url", server.url]
    print(f"{arm} seed {seed}: {args.budget:g} s", flush=True)
    try:
        subprocess.run(cmd, check=True)
    finally:
        if server is not None:
            server.stop()
    subprocess.run([sys.executable, __file__, "--evaluate", str(run), "--out", str(args.out)], check=True)
    return json.loads((run / "result.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("ttq"))
    ap.add_argument("--teacher", type=Path, help="SmolLM2-135M-Instruct as safetensors (`kdkit model import`)")
    ap.add_argument("--rows", type=Path, help="a directory `examples/smollm2_kd_vs_ce.py --out DIR` wrote")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--budget", type=float, default=150.0, help="wall-clock seconds per arm and seed")
    ap.add_argument("--marks", type=int, default=6, help="evenly spaced marks in the budget where students are saved")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--new-tokens", type=int, default=64, help="on-policy: the most tokens per answer")
    ap.add_argument("--summary-only", action="store_true", help="write the summary from the arm-seeds that finished")
    ap.add_argument("--one", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--evaluate", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    stop_on_sigterm()  # a kill stops the servers this script started, not only a normal exit
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # the saves' and loads' bars, in every process
    if args.one:
        one(args)
        return 0
    if args.evaluate:
        d = json.loads((args.out / "data" / "inputs.json").read_text())
        record = json.loads((args.evaluate / "run.json").read_text())
        record["curve"] = evaluate(args.evaluate, d)
        (args.evaluate / "result.json").write_text(json.dumps(record, indent=1))
        for p in record["marks"]:
            shutil.rmtree(args.evaluate / p["dir"])
        return 0
    if not args.summary_only and args.teacher is None:
        ap.error("--teacher: SmolLM2-135M-Instruct as safetensors")
    d = prepare(args) if not args.summary_only else json.loads((args.out / "data" / "inputs.json").read_text())
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for seed in range(args.seeds):  # interleaved: a drift in the machine's speed hits every arm alike
        for arm in args.arms:
            done = args.out / "runs" / f"{arm}_s{seed}" / "result.json"
            if args.summary_only:
                runs[arm] += [json.loads(done.read_text())] if done.is_file() else []
            else:
                runs[arm].append(run_arm(arm, seed, args, d))
    s = summarize(runs, d)
    s.update(budget_s=args.budget, lr=args.lr, new_tokens=args.new_tokens, machine=machine())
    (args.out / "summary.json").write_text(json.dumps(s, indent=1))
    (args.out / "summary.md").write_text(table(s) + "\n")
    plot(s, runs, args.out / "time_to_quality.png")
    print(table(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
