"""Naive float64 references: the formulas as written on paper, no numerical tricks.

Each divergence works on explicit probability vectors (not log-probs), one
position at a time in a Python loop, so that it is obviously right; they are
slow and only fit test shapes. Inputs must be finite (the -inf cases are tested as properties instead).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def softmax64(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_i p_i (log p_i − log q_i), straight from the definition."""
    return (p * (torch.log(p) - torch.log(q))).sum()


def ref_div(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float, alpha: float) -> torch.Tensor:
    """One position: p = teacher probs, q = student probs (1-D float64)."""
    if kind == "kl_fwd":
        return kl(p, q)
    if kind == "kl_rev":
        return kl(q, p)
    if kind == "teacher_ce":
        return -(p * torch.log(q)).sum()
    if kind == "jsd":
        if beta == 0.0:
            return kl(p, q)
        if beta == 1.0:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_fwd":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_rev":
        return kl(q, alpha * q + (1 - alpha) * p)
    if kind == "tvd":
        return 0.5 * torch.abs(p - q).sum()
    raise KeyError(kind)


def ref_dense(student, teacher, kind, *, temperature=1.0, t2_scale=True, beta=0.5, alpha=0.1):
    """float64 per-position divergence, dense teacher logits."""
    s = softmax64(student.double() / temperature)
    t = softmax64(teacher.double() / temperature)
    lead = s.shape[:-1]
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    out = torch.stack([ref_div(t2[i], s2[i], kind, beta, alpha) for i in range(s2.shape[0])])
    scale = temperature**2 if t2_scale else 1.0
    return (out * scale).reshape(lead)


def ref_topk(student, ids, teacher_logprobs, kind, *, temperature=1.0, t2_scale=True, beta=0.5, alpha=0.1,
             tail="bucket"):
    """float64 per-position divergence against a top-K teacher (ids, full-softmax log-probs)."""
    s = softmax64(student.double() / temperature)
    lead = s.shape[:-1]
    s2 = s.reshape(-1, s.shape[-1])
    ids2 = ids.reshape(-1, ids.shape[-1]).long()
    tp2 = torch.exp(teacher_logprobs.double()).reshape(-1, ids.shape[-1])
    vals = []
    for i in range(s2.shape[0]):
        pt = tp2[i]
        ps = s2[i][ids2[i]]
        if tail == "bucket":
            pt = torch.cat([pt, (1 - pt.sum()).reshape(1)])
            ps = torch.cat([ps, (1 - ps.sum()).reshape(1)])
        else:
            pt = pt / pt.sum()
            ps = ps / ps.sum()
        vals.append(ref_div(pt, ps, kind, beta, alpha))
    scale = temperature**2 if t2_scale else 1.0
    return (torch.stack(vals) * scale).reshape(lead)


def ref_aggregate(values, mask, how: str, eps: float = 1e-8) -> float:
    v = np.asarray(values, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if v.size == 0:
        return 0.0
    if how == "mean":
        return float(v.mean())
    if how == "sum":
        return float(v.sum())
    if how == "rmse":
        return math.sqrt(float((v**2).mean()) + eps)
    if how == "p95":
        return float(np.percentile(v, 95))
    if how == "max":
        return float(v.max())
    raise KeyError(how)


REFERENCE_KINDS = ("kl_fwd", "kl_rev", "teacher_ce", "jsd", "skew_fwd", "skew_rev", "tvd")
REFERENCE_AGGREGATIONS = ("mean", "sum", "rmse", "p95", "max")
