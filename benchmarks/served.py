"""Capture throughput: `kdkit precompute` from a vLLM server vs the local forward, same rows, same machine.

    make vllm-env
    python examples/smollm2_chat_rows.py --out /tmp/kdkit-real/smollm2     # SmolLM2-135M-Instruct + 48 rows
    python benchmarks/served.py --real /tmp/kdkit-real/smollm2 [--rounds 3]

One vLLM server of the teacher (float32, --max-logprobs 64) is started once and stays up; each round
runs, in fresh subprocesses and interleaved, the local capture (a transformers forward in kdkit's
process, the model load included) and the served capture (the server warm). Reported per variant: the
median over rounds of the capture's seconds and target tokens per second, and that both caches hold
the same ids at most positions (float16 log-probs within 1e-3 plus one float16 step). JSON lines, then a table.
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


def one(teacher: str, data: str, out: str, url: str | None, top_k: int, batch: int, max_length: int) -> dict:
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

    s = PrecomputeSettings(top_k=top_k, batch_size=batch, max_length=max_length, teacher_url=url)
    t0 = time.perf_counter()
    m = precompute(teacher, data, out, s, progress=False, log=lambda msg: None)
    sec = time.perf_counter() - t0
    return {"variant": "served" if url else "local", "seconds": round(sec, 3), "tokens": m["tokens"],
            "tokens_per_s": round(m["tokens"] / sec, 1)}


def same_ids(a: Path, b: Path) -> float:
    import numpy as np

    from kdkit.teacher.cache import TeacherCache

    ca, cb = TeacherCache(a), TeacherCache(b)
    same = total = 0
    for r in range(len(ca)):
        ra, rb = ca.row(r), cb.row(r)
        a64, b64 = ra.logprobs.astype(np.float64), rb.logprobs.astype(np.float64)
        # float32 on both sides agrees to < 1e-3; float16 storage then rounds each side: one ulp apart at most
        assert np.all(np.abs(a64 - b64) <= 1e-3 + np.spacing(np.abs(ra.logprobs).astype(np.float16)))
        same, total = same + int((ra.ids == rb.ids).all(-1).sum()), total + len(ra.pos)
    return same / max(total, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, metavar="DIR", help="what examples/smollm2_chat_rows.py wrote")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--one", nargs=3, metavar=("TEACHER", "DATA", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    stop_on_sigterm()  # a kill stops the servers this script started, not only a normal exit
    if args.one:
        print(json.dumps(one(*args.one, args.url, args.top_k, args.batch_size, args.max_length)))
        return 0
    from tests.vllm_server import VllmServer

    teacher, data = Path(args.real) / "teacher", Path(args.real) / "rows_prompt_completion.jsonl"
    runs: dict[str, list[dict]] = {"local": [], "served": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = VllmServer(teacher, tmp / "vllm.log").start()
        try:
            for i in range(args.rounds):  # interleaved: a drift in the machine's speed hits both alike
                for variant in ("local", "served"):
                    out = tmp / f"{variant}-{i}"
                    cmd = [sys.executable, __file__, "--real", args.real, "--one", str(teacher), str(data), str(out),
                           "--top-k", str(args.top_k), "--batch-size", str(args.batch_size),
                           "--max-length", str(args.max_length)] + (["--url", server.url] if variant == "served" else [])
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        return 1
                    runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(json.dumps({**runs[variant][-1], "round": i, **machine()}), flush=True)
            agree = same_ids(tmp / "local-0", tmp / "served-0")
        finally:
            server.stop()
    print(f"\nsame ids at {agree:.4f} of positions; log-probs within 1e-3 + one float16 step\n")
    print("| capture | seconds (median) | target tokens/s (median) | rounds |")
    print("|---|---|---|---|")
    for variant, rs in runs.items():
        print(f"| {variant} | {statistics.median(r['seconds'] for r in rs):.2f} | "
              f"{statistics.median(r['tokens_per_s'] for r in rs):,.0f} | {len(rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
