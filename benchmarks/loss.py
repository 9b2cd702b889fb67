"""Peak memory and time of CE + top-K KD, forward + backward: a naive dense path (kdkit's general
divergence on full logits), a lean dense one (one log-softmax, gathers, the tail bucket by hand: what a
careful engineer writes; the baseline of the ratios) and kdkit's chunked path.

    python benchmarks/loss.py            # H=576, V in {49152, 151936}, N in {1024, 4096}, K=64
    python benchmarks/loss.py --quick    # V=49152, N=1024 only
    python benchmarks/loss.py --profile 64 256 --vocab 49152 --n 4096   # where the chunked pass's time goes

Each (method, V, N) runs in a fresh subprocess so its peak is its own. On CPU the
peak is the growth of the process's max RSS over the inputs already allocated
(getrusage); on CUDA it is torch.cuda.max_memory_allocated. Time is the median of
--repeats forward+backward passes after one warm-up. Prints one JSON object per
line and a markdown table; the ratios (chunked / naive) are the claims.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_step(method: str, vocab: int, n: int, hidden: int, k: int, chunk: int):
    """One forward + backward of ``method`` on seeded inputs, as a function (its inputs allocated here)."""
    import torch

    from kdkit.loss.chunked import KDSpec, chunked_ce_kd
    from kdkit.loss.divergences import TopK, token_divergence

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h = torch.randn(n, hidden, device=dev, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev) * 0.02).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), device=dev)
    ids = torch.randint(0, vocab, (n, k), device=dev)
    lp = torch.log_softmax(torch.randn(n, k, device=dev), -1) - 0.5
    teacher = TopK(ids, lp)
    ce_w = torch.full((n,), 1.0 / n, device=dev)

    def step() -> None:
        if method == "naive":
            logits = h @ w.t()
            ce = torch.nn.functional.cross_entropy(logits, targets)
            kd = token_divergence(logits, teacher, "kl_fwd").mean()
            (ce + kd).backward()
        elif method == "lean":  # what a careful engineer writes: one log-softmax, gathers, the bucket by hand
            s_lp = torch.log_softmax(h @ w.t(), dim=-1)
            ce = -s_lp.gather(-1, targets[:, None]).mean()
            s_k = s_lp.gather(-1, ids)
            p_t = lp.exp()
            t_tail = torch.log1p(-p_t.sum(-1))
            s_tail = torch.log1p(-s_k.exp().sum(-1).clamp(max=1 - 1e-6))
            kd = ((p_t * (lp - s_k)).sum(-1) + t_tail.exp() * (t_tail - s_tail)).mean()
            (ce + kd).backward()
        else:
            loss, _ = chunked_ce_kd(h, w, targets, teacher=teacher, ce_weights=ce_w, kd_weights=ce_w,
                                    spec=KDSpec(kind="kl_fwd"), chunk_size=chunk)
            loss.backward()
        h.grad = None
        w.grad = None

    return step


def one(method: str, vocab: int, n: int, hidden: int, k: int, repeats: int, chunk: int) -> dict:
    import torch

    from kdkit.loss.chunked import auto_chunk

    chunk = chunk or auto_chunk(vocab)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    step = make_step(method, vocab, n, hidden, k, chunk)

    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _rss_mb()
    step()  # warm-up (its peak counts: it is the same work)
    times = []
    for _ in range(repeats):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = ((torch.cuda.max_memory_allocated() - base) / 2**20) if dev == "cuda" else (_rss_mb() - base_rss)
    return {"method": method, "V": vocab, "N": n, "H": hidden, "K": k, "chunk": chunk, "device": dev,
            "peak_mb": round(peak, 1), "time_s": round(statistics.median(times), 4)}


def profile(vocab: int, n: int, hidden: int, k: int, chunks: list[int]) -> None:
    """Where a chunked forward + backward spends its time, by operator (self CPU time of one pass after a
    warm-up, torch.profiler), for each chunk size side by side."""
    import torch
    from torch.profiler import ProfilerActivity

    tables = {}
    for chunk in chunks:
        step = make_step("chunked", vocab, n, hidden, k, chunk)
        step()
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wall = time.perf_counter() - t0
        ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        tables[chunk] = (wall, ops)
    top = sorted({op for _, ops in tables.values() for op in ops}, key=lambda op: -max(t[1].get(op, 0.0)
                                                                                      for t in tables.values()))[:12]
    print(f"\nV = {vocab}, N = {n}, H = {hidden}, K = {k}: self CPU seconds (share of the pass) by operator\n")
    print("| operator | " + " | ".join(f"chunk {c}" for c in chunks) + " |")
    print("|---|" + "---|" * len(chunks))
    for op in top:
        cells = [f"{ops.get(op, 0.0):.3f} ({ops.get(op, 0.0) / sum(ops.values()):.0%})" for _, ops in tables.values()]
        print(f"| {op} | " + " | ".join(cells) + " |")
    print("| (wall, profiled) | " + " | ".join(f"{wall:.3f}" for wall, _ in tables.values()) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=0, help="positions per chunk (default 0: kdkit's auto, from V)")
    ap.add_argument("--profile", nargs="+", type=int, metavar="CHUNK",
                    help="profile the chunked pass at these chunk sizes (with --vocab, --n) instead of the grid")
    ap.add_argument("--vocab", type=int, default=49152, help="with --profile")
    ap.add_argument("--n", type=int, default=4096, help="with --profile")
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "V", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    hidden, k = 576, 64
    if args.profile:
        profile(args.vocab, args.n, hidden, k, args.profile)
        return 0
    if args.one:
        m, v, n = args.one
        print(json.dumps(one(m, int(v), int(n), hidden, k, args.repeats, args.chunk)))
        return 0
    grid = [(49152, 1024)] if args.quick else [(49152, 1024), (49152, 4096), (151936, 1024), (151936, 4096)]
    rows = []
    for v, n in grid:
        res = {}
        for method in ("naive", "lean", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--one", method, str(v), str(n), "--repeats",
                                  str(args.repeats), "--chunk", str(args.chunk)], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 1
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(res[method]))
        rows.append((v, n, res["naive"], res["lean"], res["chunked"]))
    import torch

    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print("\n| V | N | naive peak MB | lean peak MB | chunked peak MB | memory vs lean | naive s | lean s | chunked s "
          "| time vs lean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v, n, a, le, b in rows:
        print(f"| {v} | {n} | {a['peak_mb']:.0f} | {le['peak_mb']:.0f} | {b['peak_mb']:.0f} | "
              f"{b['peak_mb'] / max(le['peak_mb'], 1e-9):.3f} | {a['time_s']:.3f} | {le['time_s']:.3f} | "
              f"{b['time_s']:.3f} | {b['time_s'] / le['time_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
