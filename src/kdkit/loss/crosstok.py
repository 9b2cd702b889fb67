"""Distillation across tokenizers: align two tokenisations of one text, and compare distributions over two
vocabularies.

Alignment. Both tokenizers split the same text; a token's span is its characters (offsets). A boundary is
a character index where a token starts (or the text ends); the boundaries both tokenisations share cut the
text into spans, so every character lies in exactly one span. Each span's first student token and first
teacher token are aligned: the student position predicting the one and the teacher position predicting
the other see the same text before them and predict the same next characters. A completion's final EOS is
aligned with the teacher's EOS. Special tokens without characters (BOS) never align.

Losses at an aligned position, p_t over the teacher's vocabulary and p_s over the student's, both at
temperature T:

* ``uld`` (Universal Logit Distillation, Boizard et al. 2024): Σ_k |sort(p_t)_k − sort(p_s)_k|, both
  sorted descending and the shorter zero-padded — it needs no shared token.
* ``gold`` (as TRL's GOLD): tokens whose text is the same in both vocabularies are matched; the divergence
  ``objective.kd.kind`` is taken over the matched tokens plus one bucket holding each side's unmatched
  mass, and ULD is added over the unmatched probabilities. With identical tokenizers every token matches,
  the buckets are empty and the loss is the same-tokenizer divergence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdkit.loss.divergences import TopK, token_divergence

CROSS_LOSSES = ("uld", "gold")


def shared_boundaries(student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]], end: int) -> list[int]:
    """Character indices where a token starts in both tokenisations, and the text's end, ascending."""
    starts_s = {a for a, b in student if b > a}
    starts_t = {a for a, b in teacher if b > a}
    return sorted((starts_s & starts_t) | {end})


def spans(student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]], end: int,
          start: int = 0) -> list[tuple[int, int]]:
    """The spans [c, c') between consecutive shared boundaries from ``start``: they cover every character of
    [start, end) exactly once."""
    cuts = [c for c in shared_boundaries(student, teacher, end) if c >= start]
    if not cuts or cuts[0] != start:
        cuts = [start, *cuts]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def align(student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]], targets: Sequence[int],
          end: int) -> list[tuple[int, int]]:
    """(student token index, teacher token index) of tokens that start a shared span, for the student's target
    tokens ``targets`` (indices); positions predicting them are index − 1 on each side."""
    first_t = {}
    for i, (a, b) in enumerate(teacher):
        if b > a:
            first_t.setdefault(a, i)
    cuts = set(shared_boundaries(student, teacher, end))
    out = []
    for j in targets:
        a, b = student[j]
        if b > a and a in cuts and a in first_t and first_t[a] > 0 and j > 0:
            out.append((j, first_t[a]))
    return out


def teacher_view(text: str, offsets: Sequence[tuple[int, int]], loss_mask: Sequence[bool], tokenizer: Any
                 ) -> tuple[list[int], list[tuple[int, int]]]:
    """The teacher tokenizer's ids for a student row's text, and the aligned (student token, teacher token)
    pairs over the row's targets; a row that ends in EOS gets the teacher's EOS, the two aligned."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    targets = [j for j, m in enumerate(loss_mask) if m]
    pairs = align(offsets, offs, targets, len(text))
    end = len(text)
    if targets and tuple(offsets[targets[-1]]) == (end, end) and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
        pairs.append((targets[-1], len(ids) - 1))  # both end the text: their EOS predictions align
    return ids, pairs


def uld(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Σ_k |sort(p_t)_k − sort(p_s)_k| per position ([N, V_s], [N, V_t] → [N]), float32."""
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    return _sorted_l1(p_t, p_s)


@dataclass(frozen=True)
class VocabMap:
    """Token ids with the same text in both vocabularies (``student[i]`` ↔ ``teacher[i]``)."""

    student: Tensor
    teacher: Tensor

    @classmethod
    def build(cls, student_tok: Any, teacher_tok: Any, student_vocab: int, teacher_vocab: int) -> VocabMap:
        """Match tokens by their vocabulary strings, with the byte-level (``Ġ``, ``Ċ``) and SentencePiece
        (``▁``) markers read as the space and newline they stand for; the first id wins a collision. Two
        copies of one tokenizer match every token."""
        def texts(tok: Any, n: int) -> dict[str, int]:
            out: dict[str, int] = {}
            for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(n)))):
                if piece is not None:
                    out.setdefault(piece.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n"), i)
            return out

        s, t = texts(student_tok, student_vocab), texts(teacher_tok, teacher_vocab)
        common = sorted(set(s) & set(t), key=lambda x: s[x])
        return cls(torch.tensor([s[x] for x in common], dtype=torch.long),
                   torch.tensor([t[x] for x in common], dtype=torch.long))


def gold(student_logits: Tensor, teacher_logits: Tensor, vmap: VocabMap, kind: str, temperature: float = 1.0,
         t2_scale: bool = True, beta: float = 0.5, alpha: float = 0.1) -> Tensor:
    """The matched-token divergence (with an unmatched bucket per side) + ULD over the unmatched mass, [N];
    the sum × T² with ``t2_scale``."""
    lp_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    lp_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    ms, mt = vmap.student.to(lp_s.device), vmap.teacher.to(lp_t.device)
    # the teacher's matched log-probs as a TopK over the student's matched ids: the bucket is the rest
    teacher = TopK(ms.expand(lp_t.shape[0], -1), lp_t[:, mt])
    div = token_divergence(student_logits, teacher, kind, temperature=temperature, t2_scale=False, beta=beta,
                           alpha=alpha, tail="bucket")
    rest_s = torch.ones(lp_s.shape[-1], dtype=torch.bool, device=lp_s.device)
    rest_s[ms] = False
    rest_t = torch.ones(lp_t.shape[-1], dtype=torch.bool, device=lp_t.device)
    rest_t[mt] = False
    if rest_s.any() or rest_t.any():
        p_s = torch.exp(lp_s[:, rest_s]).sort(dim=-1, descending=True).values
        p_t = torch.exp(lp_t[:, rest_t]).sort(dim=-1, descending=True).values
        div = div + _sorted_l1(p_t, p_s)
    return div * (temperature * temperature) if t2_scale else div


@dataclass(frozen=True)
class CrossTeacher:
    """A teacher with another tokenizer, at the aligned positions of a batch: its logits ``[N, V_t]`` and, for
    each, the batch row and the student's prediction position; ``loss`` is ``uld`` or ``gold``."""

    logits: Tensor
    rows: Tensor
    pos: Tensor
    vmap: VocabMap
    loss: str


def cross_divergence(student_logits: Tensor, teacher: CrossTeacher, kind: str, temperature: float, t2_scale: bool,
                     beta: float, alpha: float) -> tuple[Tensor, Tensor]:
    """Per-position values ``[B, T]`` (0 where nothing is aligned) and the aligned-position mask."""
    sel = student_logits[teacher.rows, teacher.pos]
    if teacher.loss == "uld":
        vals = uld(sel, teacher.logits, temperature) * (temperature * temperature if t2_scale else 1.0)
    else:
        vals = gold(sel, teacher.logits, teacher.vmap, kind, temperature, t2_scale, beta, alpha)
    shape = student_logits.shape[:2]
    out = torch.zeros(shape, dtype=torch.float32, device=student_logits.device).index_put(
        (teacher.rows, teacher.pos), vals)
    aligned = torch.zeros(shape, dtype=torch.bool, device=student_logits.device)
    aligned[teacher.rows, teacher.pos] = True
    return out, aligned


@dataclass(frozen=True)
class CrossTopK:
    """A cached teacher with another tokenizer: its top-K ids (its vocabulary) and log-probs at the student's
    prediction positions (``-inf`` where no teacher position aligned), with the stored tail mass."""

    topk: TopK
    vmap: VocabMap
    loss: str


def _sorted_l1(a: Tensor, b: Tensor) -> Tensor:
    """Σ_k |a_k − b_k| of two descending probability vectors, the shorter zero-padded, [N]."""
    width = max(a.shape[-1], b.shape[-1])
    return (torch.nn.functional.pad(a, (0, width - a.shape[-1])) -
            torch.nn.functional.pad(b, (0, width - b.shape[-1]))).abs().sum(dim=-1)


def cross_topk_divergence(student_logits: Tensor, teacher: CrossTopK, kind: str, temperature: float,
                          t2_scale: bool, beta: float, alpha: float) -> tuple[Tensor, Tensor]:
    """:func:`cross_divergence` for a top-K teacher. ``uld``: the teacher's K sorted probabilities against the
    student's K largest, plus |teacher tail − student rest|. ``gold``: ``kind`` over the teacher's matched top-K
    entries with one bucket per side for everything else, plus ULD between the teacher's unmatched top-K
    probabilities and the student's largest unmatched ones. At K = the teacher's vocabulary both equal the
    live losses."""
    tk = teacher.topk
    aligned = torch.isfinite(tk.logprobs).any(dim=-1)
    s = student_logits[aligned].float()
    ids, lp, tail = tk.ids[aligned].long(), tk.logprobs[aligned].float(), tk.tail_logmass()[aligned]
    p_s = torch.softmax(s / temperature, dim=-1)
    if teacher.loss == "uld":
        top_s = p_s.topk(min(ids.shape[-1], p_s.shape[-1]), dim=-1).values
        vals = _sorted_l1(torch.exp(lp), top_s) + (torch.exp(tail) - (1.0 - top_s.sum(-1))).abs()
    else:
        lookup = torch.full((max(int(ids.max()) if ids.numel() else 0, int(teacher.vmap.teacher.max())) + 1,), -1,
                            dtype=torch.long, device=ids.device)
        lookup[teacher.vmap.teacher.to(ids.device)] = teacher.vmap.student.to(ids.device)
        sid = lookup[ids]
        matched = sid >= 0
        # matched entries first (at most V_s of them: the map is one-to-one), so K may exceed V_s
        first = torch.argsort((~matched).to(torch.int8), dim=-1, stable=True)[:, :min(ids.shape[-1], s.shape[-1])]
        m_ids, m_ok = torch.gather(sid, -1, first), torch.gather(matched, -1, first)
        m_lp = torch.where(m_ok, torch.gather(lp, -1, first), torch.full_like(m_ids, float("-inf"), dtype=lp.dtype))
        vals = token_divergence(s, TopK(torch.where(m_ok, m_ids, torch.zeros_like(m_ids)), m_lp), kind,
                                temperature=temperature, t2_scale=False, beta=beta, alpha=alpha, tail="bucket")
        rest_s = p_s.clone()
        rest_s[:, teacher.vmap.student.to(ids.device)] = 0.0  # the student's unmatched probabilities
        t_rest = torch.where(matched, torch.zeros_like(lp), torch.exp(lp)).sort(dim=-1, descending=True).values
        vals = vals + _sorted_l1(t_rest, rest_s.topk(min(ids.shape[-1], rest_s.shape[-1]), dim=-1).values)
    vals = vals * (temperature * temperature) if t2_scale else vals
    out = torch.zeros(aligned.shape, dtype=torch.float32, device=student_logits.device)
    return out.masked_scatter(aligned, vals), aligned
