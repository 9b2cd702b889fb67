"""Tiny models, tokenizers and data files built in-process for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdkit.demo.tokenizer import build_char_tokenizer


def tiny_llama(vocab_size: int, *, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def save_model_dir(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, extra_vocab: int = 0,
                   heads: int = 4) -> Path:
    """A tiny Llama + char tokenizer saved as a Hugging Face directory (safetensors). vLLM's CPU attention
    needs a head size of 32 or more: ``hidden=64, heads=2``."""
    tok = build_char_tokenizer()
    model = tiny_llama(len(tok) + extra_vocab, seed=seed, hidden=hidden, layers=layers, heads=heads)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion rows of varied lengths (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=g))
        pad = " " * int(torch.randint(0, 12, (1,), generator=g))
        rows.append({"prompt": f"def f{i}(x):{pad}\n", "completion": f"    return x * {a} + {b}\n",
                     "role": "anchor" if i % 2 else "new", "task": f"T/{i % 5}"})
    return rows


TOY_TASKS = [{"task_id": f"toy/{i}", "prompt": f"def add{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n",
              "entry_point": f"add{i}", "test": f"def check(c):\n    assert c(1) == {1 + i}\n    assert c(2) == {2 + i}\n"}
             for i in range(3)]
"""Three executable tasks the tiny models answer (wrongly, mostly): a gate's anchors in miniature."""


def distill_world(root: Path) -> Path:
    """A teacher, a smaller student, 8 toy rows, the toy tasks and the teacher's top-8 cache of the rows."""
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

    save_model_dir(root / "teacher", seed=1)
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(8))
    write_jsonl(root / "tasks.jsonl", TOY_TASKS)
    precompute(root / "teacher", root / "train.jsonl", root / "cache", PrecomputeSettings(top_k=8), progress=False,
               log=lambda m: None)
    return root


def kill_then_resume(cfg: Path, run: Path, fault: str, before_resume=None) -> None:
    """`kdkit train` killed by KDKIT_FAULT_TRAIN=<fault> (kill -9), then `--resume`d to the end."""
    import os
    import subprocess
    import sys

    from kdkit.train import FAULT_ENV

    cmd = [sys.executable, "-m", "kdkit", "train", str(cfg), "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env={**os.environ, FAULT_ENV: fault}, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    if before_resume is not None:
        before_resume()
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def write_config(tmp: Path, body: dict) -> Path:
    """A training config YAML in ``tmp`` with a fresh name."""
    import yaml

    p = tmp / f"cfg-{len(list(tmp.glob('cfg-*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]
