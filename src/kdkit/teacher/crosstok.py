"""The teacher's side of distillation across tokenizers: one forward over the teacher's own tokenisation of
the student's rows, read at the aligned positions (:mod:`kdkit.loss.crosstok` aligns and compares)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdkit.data.rows import pad
from kdkit.models.load import ModelError, pad_id, vocab_logits


def aligned_teacher_logits(model: Any, tokenizer: Any, views: list[tuple[list[int], list[tuple[int, int]]]],
                           device: torch.device, what: str = "teacher") -> tuple[Tensor, Tensor, Tensor]:
    """One teacher forward over :func:`kdkit.loss.crosstok.teacher_view` sequences (right-padded): its logits
    at the positions predicting each aligned teacher token ``[N, V_t]``, with the batch row and the student
    prediction position of each (row-major, in target order)."""
    width = max(len(ids) for ids, _ in views)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and width > limit:
        raise ModelError(f"the {what} tokenizes a row's text into {width} tokens but has {limit} positions; lower "
                         f"data.max_length (the {what} sees the text the student keeps)")
    ids, att = pad([t_ids for t_ids, _ in views], pad_id(tokenizer))
    logits = vocab_logits(model(input_ids=ids.to(device), attention_mask=att.to(device)).logits, len(tokenizer), what)
    rows = torch.tensor([b for b, (_, pairs) in enumerate(views) for _ in pairs], dtype=torch.long, device=device)
    t_pos = torch.tensor([i - 1 for _, pairs in views for _, i in pairs], dtype=torch.long, device=device)
    s_pos = torch.tensor([j - 1 for _, pairs in views for j, _ in pairs], dtype=torch.long, device=device)
    return logits[rows, t_pos], rows, s_pos
