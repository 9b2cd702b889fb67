"""What each layer of the verifier costs per task: the same canonical solutions, verified under each layer set.

    python benchmarks/verifier_layers.py [--tasks ../shared/data/mbpp/mbpp.jsonl] [--limit 300] [--repeats 2]

Arms, interleaved (each repeat runs every arm once, in turn): ``harness`` (``--unsafe-no-isolation``: the
harness's keyed report and audit hook, no namespaces), ``bwrap`` (bubblewrap namespaces, tmpfs, uid; the
process filter taken out for this measurement only) and ``bwrap+filter`` (what kdkit runs). Prints JSON and a
table of milliseconds per task (median over repeats); every arm must pass every task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"


def _without_filter(args: list[str]) -> list[str]:
    i = args.index("--seccomp")
    return args[:i] + args[i + 2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=str(MBPP))
    ap.add_argument("--limit", type=int, default=300, help="the first N tasks (0: all)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from kdkit.evaluate import sandbox
    from kdkit.evaluate.passrate import verify
    from kdkit.evaluate.sandbox import Limits
    from kdkit.evaluate.tasks import load_tasks

    tasks = load_tasks(args.tasks)
    tasks = tasks[:args.limit] if args.limit else tasks
    sols = {t.task_id: [t.canonical_solution] for t in tasks}
    real = sandbox._bwrap_args
    arms = {"harness": (True, real), "bwrap": (False, lambda *a: _without_filter(real(*a))),
            "bwrap+filter": (False, real)}
    sandbox.check_isolation()  # once, with the filter in force: it refuses a sandbox where a fork succeeds
    times: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(args.repeats):
        for arm, (unsafe, bwrap_args) in arms.items():
            sandbox._bwrap_args = bwrap_args
            t0 = time.perf_counter()
            res = verify(tasks, sols, limits=Limits(timeout_s=20), workers=args.workers, unsafe_no_isolation=unsafe)
            times[arm].append(time.perf_counter() - t0)
            bad = [r.task_id for r in res if not r.passed]
            if bad:
                raise SystemExit(f"{arm}: {len(bad)} canonical solutions did not pass: {bad[:5]}")
    sandbox._bwrap_args = real
    out = {"tasks": args.tasks, "n_tasks": len(tasks), "workers": args.workers, "repeats": args.repeats,
           "machine": machine(), "seconds": times,
           "ms_per_task": {a: 1000 * statistics.median(t) / len(tasks) for a, t in times.items()}}
    print(json.dumps(out, indent=2))
    print(f"\n| arm | ms per task (median of {args.repeats}, {args.workers} workers) | runs (s) |\n|---|---|---|")
    for a, t in times.items():
        print(f"| {a} | {out['ms_per_task'][a]:.1f} | {', '.join(f'{x:.1f}' for x in t)} |")


if __name__ == "__main__":
    main()
