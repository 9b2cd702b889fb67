"""Memory-lean CE + KD straight from hidden states: at most ``chunk × V`` float32 logits at a time.

A naive KD loss materialises ``[N, V]`` float32 logits for the student (and the
teacher), their softmaxes and their gradients. Here the LM head is applied to
``chunk`` positions at a time; for each chunk the loss and its gradient with
respect to the chunk's logits are computed (with the same ``token_divergence``
body as the dense path), and immediately folded into the gradients of the hidden
states and of the LM-head weight. ``backward`` only scales those by the incoming
gradient. Values and gradients equal the dense path up to float32 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdkit.loss.divergences import IGNORE_INDEX, TopK, token_ce, token_divergence

CHUNK_BYTES = 64 * 2**20
MIN_CHUNK = 256


def auto_chunk(vocab: int) -> int:
    """Positions per chunk for ``objective.chunk_size: auto``: the largest power of two whose [chunk, V] float32
    logits fit in :data:`CHUNK_BYTES`, between :data:`MIN_CHUNK` and 1024 (1024 up to V = 16,384, 512 at
    V = 32,000, 256 from V = 49,152 up). Each chunk multiplies by the LM head's weight twice and adds to its
    gradient once, whatever its size: with fewer positions those weight-sized passes set the time (at
    V = 49,152 and N = 4096, the head's matrix products took 6.0 s of a 7.9 s pass with 64 positions per
    chunk, 4.5 s of 6.0 s with 256 and 4.7 s of 6.1 s with 1024; docs/benchmarks.md)."""
    fit = max(1, CHUNK_BYTES // (4 * vocab))
    return max(MIN_CHUNK, min(1024, 1 << (fit.bit_length() - 1)))


@dataclass(frozen=True)
class KDSpec:
    kind: str = "kl_fwd"
    temperature: float = 1.0
    t2_scale: bool = True
    beta: float = 0.5
    alpha: float = 0.1
    tail: str = "bucket"


@dataclass
class ChunkStats:
    """Per-position values for metrics (detached): the caller reduces them with its own mask, the same
    way as on the dense path (:func:`kdkit.train.objective.kd_sums`)."""

    ce_sum: Tensor | None = None  # float32 0-dim, on the device: Σ CE over the valid positions
    kd_div: Tensor | None = None  # float32 [N]: the KD divergence at every valid position (0 elsewhere)
    student_top: Tensor | None = None  # long [N]: the student's argmax token


def _slice_teacher(teacher: Tensor | TopK | None, lo: int, hi: int) -> Tensor | TopK | None:
    if teacher is None:
        return None
    return teacher.select(slice(lo, hi)) if isinstance(teacher, TopK) else teacher[lo:hi]


def _chunk_loss(logits: Tensor, targets: Tensor, teacher: Tensor | TopK | None, ce_w: Tensor, kd_w: Tensor,
                spec: KDSpec, stats: ChunkStats, lo: int) -> Tensor:
    valid = targets != IGNORE_INDEX
    # at T = 1 one log-softmax serves CE and KD (the chunk's widest op, [chunk, V], done once)
    shared = teacher is not None and spec.temperature == 1.0
    lp = torch.log_softmax(logits.float(), dim=-1) if shared else None
    ce = token_ce(logits, targets, log_probs=lp)
    loss = (ce * ce_w).sum()
    stats.ce_sum = stats.ce_sum + ce.detach().sum()  # stays on the device (no per-chunk host read)
    if teacher is not None:
        div = token_divergence(lp if shared else logits, teacher, spec.kind, temperature=spec.temperature,
                               t2_scale=spec.t2_scale, beta=spec.beta, alpha=spec.alpha, tail=spec.tail,
                               normalized=shared)
        div = torch.where(valid, div, torch.zeros_like(div))
        loss = loss + (div * kd_w).sum()
        stats.kd_div[lo:lo + len(div)] = div.detach()
        stats.student_top[lo:lo + len(div)] = logits.detach().argmax(-1)
    return loss


class _ChunkedCEKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher, ce_w, kd_w, spec, chunk, stats):
        # the teacher (dense logits or a TopK) takes no gradient: passed through as a plain argument
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden, dtype=torch.float32)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w32 = weight.float()
        b32 = bias.float() if bias is not None else None
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            h = hidden[lo:hi].float()
            with torch.enable_grad():
                logits = h @ w32.t()
                if b32 is not None:
                    logits = logits + b32
                logits = logits.detach().requires_grad_(True)
                loss = _chunk_loss(logits, targets[lo:hi], _slice_teacher(teacher, lo, hi), ce_w[lo:hi],
                                   kd_w[lo:hi], spec, stats, lo)
                (g,) = torch.autograd.grad(loss, logits)
            total += loss.detach()
            grad_h[lo:hi] = g @ w32
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
            if grad_b is not None:
                grad_b += g.sum(0)
        # the gradients are computed already: kept on ctx (not saved tensors) so backward can hand them over
        # scaled in place, without a second full-size copy of the LM head's gradient
        ctx.grads = [grad_h, grad_w, grad_b]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss was differentiated twice; its gradients are handed over once")
        grads, ctx.grads = ctx.grads, None
        out = []
        for g, dtype in zip(grads, ctx.dtypes, strict=True):
            if g is not None:
                g = g.mul_(grad_out) if g.dtype == dtype else (g * grad_out).to(dtype)
            out.append(g)
        return (*out, None, None, None, None, None, None, None)


def chunked_ce_kd(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    teacher: Tensor | TopK | None = None,
    ce_weights: Tensor,
    kd_weights: Tensor | None = None,
    spec: KDSpec = KDSpec(),
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, ChunkStats]:
    """Σ_n ce_w[n]·CE[n] + Σ_n kd_w[n]·KD[n] from hidden states, ``chunk_size`` positions at a time.

    Args:
        hidden: Tensor[N, H] final hidden states (after the final norm), any float dtype.
        weight: Tensor[V, H] LM-head weight; ``bias``: Tensor[V] or None.
        targets: LongTensor[N], ``-100`` where there is no loss.
        teacher: TopK[N, K] (every kind) or dense logits Tensor[N, V] (kl_fwd, kl_rev, jsd), or None.
        ce_weights, kd_weights: float32 Tensor[N] per-token coefficients (normalisation included).
        spec: the divergence settings. chunk_size: positions per chunk.
        ignore_index: the target id of a position without a loss (default -100).

    Returns:
        (float32 scalar loss with gradients for ``hidden``, ``weight`` and ``bias``, ChunkStats).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    n = hidden.shape[0]
    if targets.shape != (n,) or ce_weights.shape != (n,):
        raise ValueError("targets and ce_weights must be [N]")
    if teacher is not None and not isinstance(teacher, TopK) and spec.kind not in ("kl_fwd", "kl_rev", "jsd"):
        raise ValueError(f"the chunked path takes a dense teacher only for kl_fwd, kl_rev, jsd (got {spec.kind})")
    if ignore_index != IGNORE_INDEX:
        targets = torch.where(targets == ignore_index, torch.full_like(targets, IGNORE_INDEX), targets)
    kd_w = torch.zeros(n, device=hidden.device) if kd_weights is None else kd_weights.float()
    stats = ChunkStats(ce_sum=torch.zeros((), device=hidden.device), kd_div=torch.zeros(n, device=hidden.device),
                       student_top=torch.zeros(n, dtype=torch.long, device=hidden.device))
    loss = _ChunkedCEKD.apply(hidden, weight, bias, targets, teacher, ce_weights.float(), kd_w, spec, chunk_size, stats)
    return loss, stats
