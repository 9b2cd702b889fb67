"""Precompute throughput as a ratio to a bare teacher forward over the same batches, and bytes/token.

    python benchmarks/precompute.py [--rows 512] [--top-k 64] [--repeats 3]
    python benchmarks/precompute.py --teacher /tmp/smollm2/teacher --data rows.jsonl --batch-size 4 --max-length 512

Teacher: the bundled demo teacher (or --teacher); data: the tiny world's training rows (or --data). The bare
forward runs the same length-sorted batches through the model and discards the
logits; precompute adds the softmax, top-K, encoding, hashing and writing. Target:
ratio >= 0.90; bytes/token <= 4.25·K + 16. Peak memory: each of the two, once more, in a fresh process;
the growth of its RSS high-water mark from before the model is loaded (the weights count on both sides).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_rss_mb, reset_peak_rss, world_files  # noqa: E402


def _inputs(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path, list, object]:
    from kdkit.data import rows as kdata
    from kdkit.demo.run import TEACHER_DIR
    from kdkit.models.load import load_tokenizer

    teacher = Path(args.teacher) if args.teacher else TEACHER_DIR
    data = Path(args.data) if args.data else world_files(tmp, args.rows)["train"]
    tok = load_tokenizer(teacher)
    rows, rep = kdata.load_dataset(tok, data, max_length=args.max_length)
    return teacher, data, rows, rep


def _runners(args: argparse.Namespace, tmp: Path) -> tuple[object, object, tuple]:
    """(bare forward, precompute into a directory, (the data report, rows)): the two things compared."""
    import torch

    from kdkit.data import rows as kdata
    from kdkit.models.load import load_causal_lm, load_tokenizer
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

    teacher, data, rows, rep = _inputs(args, tmp)
    pad = load_tokenizer(teacher).pad_token_id
    batches = kdata.length_sorted_batches([len(r.input_ids) for r in rows], args.batch_size)

    model: list = []  # loaded by the first call (the timed calls reuse it; a peak includes it)

    def bare() -> None:
        if not model:
            model.append(load_causal_lm(teacher))
        with torch.no_grad():
            for idx in batches:
                b = kdata.collate([rows[i] for i in idx], pad)
                model[0](input_ids=b.input_ids, attention_mask=b.attention_mask)

    def capture(out: Path) -> dict:
        return precompute(teacher, data, out, PrecomputeSettings(
            top_k=args.top_k, batch_size=args.batch_size, max_length=args.max_length, shard_rows=256),
            progress=False, log=lambda m: None)

    return bare, capture, (rep, len(rows))


def _peak(which: str, args: argparse.Namespace) -> float:
    """Peak RSS growth (MB) of the bare forward or the whole precompute, in this (fresh) process."""
    with tempfile.TemporaryDirectory() as tmp:
        bare, capture, _ = _runners(args, Path(tmp))
        base = reset_peak_rss()
        bare() if which == "bare" else capture(Path(tmp) / "cache")
        return peak_rss_mb() - base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--teacher", default=None, help="a model directory (default: the demo teacher)")
    ap.add_argument("--data", default=None, help="a JSONL data file (default: the tiny world's rows)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--peak", choices=("bare", "precompute"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak:
        print(json.dumps({"peak_mb": round(_peak(args.peak, args), 1)}))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bare, capture, (rep, n_rows) = _runners(args, tmp)
        bare()
        t_bare, t_pre = [], []
        man = None
        for r in range(args.repeats):
            t0 = time.perf_counter()
            bare()
            t_bare.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            man = capture(tmp / f"cache{r}")
            t_pre.append(time.perf_counter() - t0)
    peaks = {}
    for which in ("bare", "precompute"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--peak", which], capture_output=True,
                             text=True, check=True)
        peaks[which] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    tokens = rep.target_tokens
    res = {"benchmark": "precompute", "rows": n_rows, "target_tokens": tokens, "top_k": args.top_k,
           "bare_forward_s": round(statistics.median(t_bare), 4), "precompute_s": round(statistics.median(t_pre), 4),
           "throughput_ratio": round(statistics.median(t_bare) / statistics.median(t_pre), 3),
           "bytes_per_token": round(man["bytes_per_token"], 2), "bytes_target": 4.25 * args.top_k + 16,
           "bare_peak_mb": peaks["bare"], "precompute_peak_mb": peaks["precompute"],
           "peak_ratio": round(peaks["precompute"] / max(peaks["bare"], 1e-9), 3), **machine()}
    print(json.dumps(res))
    print("\n| rows | K | bare forward s | precompute s | throughput ratio | bytes/token (target) | bare peak MB | "
          "precompute peak MB | peak ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {res['rows']} | {args.top_k} | {res['bare_forward_s']} | {res['precompute_s']} | "
          f"{res['throughput_ratio']} | {res['bytes_per_token']} ({res['bytes_target']:.0f}) | {peaks['bare']:.0f} | "
          f"{peaks['precompute']:.0f} | {res['peak_ratio']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
