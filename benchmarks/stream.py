"""Streaming precompute: peak memory against corpus size.

    python benchmarks/stream.py [--rows 2000 20000] [--top-k 16]

For each corpus size, in a fresh process: the tiny world's training rows repeated to N rows (JSONL), precomputed
by the bundled demo teacher with shards of 256 rows; the growth of the process's RSS high-water mark during the
precompute (the teacher's weights count), beside what holding the N tokenised rows in memory costs (the
reader before streaming). Flat peak across sizes = the rows stream.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_rss_mb, reset_peak_rss, world_files  # noqa: E402


def _corpus(tmp: Path, n: int) -> Path:
    rows = world_files(tmp, 512)["train"].read_text().splitlines()
    out = tmp / f"corpus-{n}.jsonl"
    out.write_text("".join(line + "\n" for line in itertools.islice(itertools.cycle(rows), n)))
    return out


def _measure(which: str, n: int, top_k: int) -> dict:
    from kdkit.data import rows as kdata
    from kdkit.demo.run import TEACHER_DIR
    from kdkit.models.load import load_tokenizer
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

    with tempfile.TemporaryDirectory() as tmp:
        data = _corpus(Path(tmp), n)
        tok = load_tokenizer(TEACHER_DIR)
        base = reset_peak_rss()
        t0 = time.perf_counter()
        if which == "held":
            rows, _ = kdata.load_dataset(tok, data, max_length=256)
            assert len(rows) == n
        else:
            man = precompute(TEACHER_DIR, data, Path(tmp) / "cache", PrecomputeSettings(top_k=top_k, shard_rows=256),
                             progress=False, log=lambda m: None)
            assert man["rows"] == n
        return {"peak_mb": round(peak_rss_mb() - base, 1), "seconds": round(time.perf_counter() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_measure(args.one[0], int(args.one[1]), args.top_k)))
        return 0
    results = []
    for n in args.rows:
        row = {"rows": n}
        for which in ("held", "precompute"):
            out = subprocess.run([sys.executable, __file__, "--top-k", str(args.top_k), "--one", which, str(n)],
                                 capture_output=True, text=True, check=True)
            row[which] = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(row)
    print(json.dumps({"benchmark": "stream", "top_k": args.top_k, "shard_rows": 256, "results": results, **machine()}))
    print("\n| rows | precompute peak RSS growth MB | precompute s | the rows held in memory MB |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['precompute']['peak_mb']:.0f} | {r['precompute']['seconds']} | "
              f"{r['held']['peak_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
