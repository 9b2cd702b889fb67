"""Capture throughput from one, two and three vLLM servers of the same teacher.

    make vllm-env
    kdkit model import smollm2 --out /tmp/kdkit-models/smollm2
    python benchmarks/served_fleet.py --model /tmp/kdkit-models/smollm2 --data ROWS.jsonl [--rows 96] [--rounds 2]

Three servers of the model (float32, `--max-logprobs 64`, each its own process) start once and stay warm;
each round then runs, in fresh subprocesses and interleaved, `kdkit precompute --teacher-url ...` with the
first one, two and three of them into an empty directory (the same rows, K = 64, batches of 8, one shard;
`--teacher` the model's tokenizer and config alone, so that no local parity check is timed), and times
it. Reported per fleet size: the median wall time, target tokens per second, the speed-up over one
server, and whether the shards are byte-identical to one server's. JSON lines, then a table.

On a machine with C cores every server's engine computes on the same C cores: the fleet's gain there is
what one server leaves idle (the HTTP answer's encoding and decoding, the client's tail sums and shard
writing, which the other servers overlap), not more arithmetic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
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


def capture(model: Path, data: Path, out: Path, urls: list[str]) -> dict:
    """One `kdkit precompute` against ``urls``: its wall seconds, its tokens and its shards' sha256."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdkit", "precompute", "--teacher", str(model), "--data", str(data),
                           "--out", str(out), "--top-k", "64", "--batch-size", "8", "--shard-rows", "100000",
                           "--max-length", "768", "--no-progress", *(a for u in urls for a in ("--teacher-url", u))],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"precompute failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    shards = hashlib.sha256(b"".join((out / s["file"]).read_bytes() for s in manifest["shards"])).hexdigest()
    return {"seconds": round(seconds, 2), "tokens": manifest["tokens"], "shards_sha256": shards}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face model directory (kdkit model import ...)")
    ap.add_argument("--data", required=True, type=Path, help="training rows (JSONL) to capture")
    ap.add_argument("--rows", type=int, default=96, help="the first N rows of --data")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--servers", type=int, default=3)
    args = ap.parse_args()
    stop_on_sigterm()  # a kill stops the servers this script started, not only a normal exit
    from tests.vllm_server import VllmServer

    from kdkit.models.load import load_tokenizer

    model = Path(args.model).resolve()
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "rows.jsonl"
        data.write_text("".join(args.data.read_text().splitlines(keepends=True)[:args.rows]))
        tok = tmp / "tokenizer"  # the tokenizer and config alone: the capture is timed, not the local parity check
        load_tokenizer(model).save_pretrained(str(tok))
        shutil.copy(model / "config.json", tok / "config.json")
        servers = [VllmServer(model, tmp / f"vllm{i}.log").launch() for i in range(args.servers)]
        try:
            for s in servers:
                s.wait()
            for r in range(args.rounds):
                for n in range(1, args.servers + 1):
                    res = capture(tok, data, tmp / f"cache-{r}-{n}", [s.url for s in servers[:n]])
                    results.append({"servers": n, "round": r, "rows": args.rows, **res})
                    print(json.dumps({**results[-1], **machine()}), flush=True)
        finally:
            for s in servers:
                s.stop()
    one = statistics.median(x["seconds"] for x in results if x["servers"] == 1)
    reference = next(x["shards_sha256"] for x in results if x["servers"] == 1)
    print(f"\n{args.rows} rows, K = 64, {machine()['cpus']} CPUs\n")
    print("| servers | capture, s (median) | target tokens / s | vs one server | shards as one server's | rounds |")
    print("|---|---|---|---|---|---|")
    for n in range(1, args.servers + 1):
        xs = [x for x in results if x["servers"] == n]
        med = statistics.median(x["seconds"] for x in xs)
        same = all(x["shards_sha256"] == reference for x in xs)
        print(f"| {n} | {med:.1f} | {xs[0]['tokens'] / med:.0f} | {one / med:.2f}× | {'yes' if same else 'NO'} | "
              f"{len(xs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
