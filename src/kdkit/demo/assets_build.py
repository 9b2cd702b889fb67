"""Fresh, seeded model directories for the tiny world (teacher and students share the tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch

from kdkit.demo.tokenizer import build_char_tokenizer

TEACHER_SHAPE = {"hidden": 128, "layers": 4, "heads": 4, "kv_heads": 4, "ffn": 384}
STUDENT_SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "ffn": 192}


def fresh_model_dir(path: Path, shape: dict[str, int], seed: int) -> Path:
    """A randomly initialised Llama (seeded) + the char tokenizer, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path
