"""Evaluation throughput: `kdkit eval` answered by a vLLM server vs the local path, same tasks, same machine.

    make vllm-env
    kdkit model import smollm2 --out /tmp/kdkit-models/smollm2
    python benchmarks/served_eval.py --model /tmp/kdkit-models/smollm2 --limits 40 164 [--rounds 1]

One vLLM server of the model (float32, --enable-lora) is started once and stays up; for each task count,
each round runs `kdkit eval` in a fresh subprocess, the local path and then the served one (interleaved:
a drift in the machine's speed hits both alike), each timed from the command's start to its end (the
local path's model load included, the server warm). Reported per variant and task count: the median
tasks per minute, the pass count, and how many tasks the two paths answered with other text (greedy
decoding on both; where they differ it is float rounding between two sets of kernels). The candidate is
the model itself, or with --adapter-rank R a LoRA adapter of rank R with small random weights (the
server loads it at run time; the local path evaluates its merged copy). JSON lines, then a table.
"""

from __future__ import annotations

import argparse
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


def eval_once(model: Path, out: Path, limit: int, max_new_tokens: int, url: str | None) -> dict:
    cmd = [sys.executable, "-m", "kdkit", "eval", str(model), "--tasks", "humaneval", "--limit", str(limit),
           "--prompt-style", "chat", "--max-new-tokens", str(max_new_tokens), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + (["--server", url] if url else []), capture_output=True, text=True)
    sec = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"variant": "served" if url else "local", "tasks": limit, "seconds": round(sec, 1),
            "tasks_per_min": round(60 * limit / sec, 2), "passed": summary["n_passed"]}


def answers(out: Path) -> dict[str, str]:
    return {g["task_id"]: g["raw"] for g in map(json.loads, (out / "generations.jsonl").read_text().splitlines())}


def candidates(model: Path, rank: int | None, tmp: Path) -> tuple[Path, Path]:
    """(what the server is asked for, what the local path evaluates): the model twice, or an adapter and its
    merged copy."""
    if rank is None:
        return model, model
    import torch
    from peft import LoraConfig, get_peft_model

    from kdkit.models.load import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    peft = get_peft_model(load_causal_lm(model), LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                            target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    tok = load_tokenizer(model)
    peft.save_pretrained(str(tmp / "adapter"))
    tok.save_pretrained(str(tmp / "adapter"))
    peft.merge_and_unload().save_pretrained(str(tmp / "merged"))
    tok.save_pretrained(str(tmp / "merged"))
    return tmp / "adapter", tmp / "merged"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face model directory (kdkit model import ...)")
    ap.add_argument("--limits", type=int, nargs="+", default=[40, 164], help="task counts (HumanEval's first N)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--adapter-rank", type=int, default=None)
    args = ap.parse_args()
    stop_on_sigterm()  # a kill stops the servers this script started, not only a normal exit
    from tests.vllm_server import LORA, VllmServer

    runs: list[dict] = []
    differ: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        served, local = candidates(Path(args.model), args.adapter_rank, tmp)
        rank = ("--max-lora-rank", str(max(8, args.adapter_rank or 8)))
        server = VllmServer(Path(args.model), tmp / "vllm.log", extra=(*LORA[0][:1], *rank), env=LORA[1]).start()
        try:
            for limit in args.limits:
                for i in range(args.rounds):
                    for variant, model, url in (("local", local, None), ("served", served, server.url)):
                        out = tmp / f"{variant}-{limit}-{i}"
                        runs.append({**eval_once(model, out, limit, args.max_new_tokens, url), "round": i})
                        print(json.dumps({**runs[-1], **machine()}), flush=True)
                a, b = answers(tmp / f"local-{limit}-0"), answers(tmp / f"served-{limit}-0")
                differ[limit] = sum(a[t] != b[t] for t in a)
        finally:
            server.stop()
    print("\n| tasks | variant | seconds (median) | tasks/min (median) | passed | answers that differ | rounds |")
    print("|---|---|---|---|---|---|---|")
    for limit in args.limits:
        for variant in ("local", "served"):
            rs = [r for r in runs if r["tasks"] == limit and r["variant"] == variant]
            print(f"| {limit} | {variant} | {statistics.median(r['seconds'] for r in rs):.1f} | "
                  f"{statistics.median(r['tasks_per_min'] for r in rs):.1f} | {rs[0]['passed']} | "
                  f"{differ[limit] if variant == 'served' else '—'} | {len(rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
