"""Per-position divergences between a teacher and a student, and their aggregation.

Pure math: no I/O, no ``nn.Module``, no normalisation over a batch (that is
``kdkit.train.objective``'s job). Every function computes in float32 whatever the input
dtype, and treats ``-inf`` logits or log-probs (a masked vocabulary entry) as
"contributes nothing": never NaN, in values or gradients.

Conventions (pinned by ``tests/test_losses.py``):

* ``kl_fwd``     KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s), teacher entropy included.
* ``kl_rev``     KL(p_s ‖ p_t).
* ``teacher_ce`` H(p_t, p_s) = −Σ p_t log p_s  (= kl_fwd + H(p_t)).
* ``jsd``        β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m), m = β·p_t + (1−β)·p_s; the
                 endpoints are defined as β=0 → kl_fwd and β=1 → kl_rev (GKD).
* ``skew_fwd``   KL(p_t ‖ α·p_t + (1−α)·p_s)   (DistiLLM).
* ``skew_rev``   KL(p_s ‖ α·p_s + (1−α)·p_t).
* ``tvd``        ½ Σ |p_t − p_s|.

A vocabulary entry whose teacher or student log-prob is ``-inf`` is removed from
the support of both distributions (not renormalised) before any kind is computed.
A position whose logits are all ``-inf`` gives 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TopK",
    "token_divergence",
    "aggregate",
    "hinge",
    "KINDS",
    "KINDS_WITH_BETA",
    "KINDS_WITH_ALPHA",
    "AGGREGATIONS",
    "TAIL_POLICIES",
    "RMSE_EPS",
    "validate_divergence_args",
]

RMSE_EPS = 1e-8
"""ε inside the RMSE's square root. In float16 1e-8 underflows to 0 and √0 has an
infinite gradient (the seeds' LoRA-at-init case), so the sum runs in float32."""

# A tail mass below this is treated as exactly zero: float32 rounding of a
# logsumexp over K ≈ V entries leaves |x| ~ 1e-7, and log(1 − e^x) there has a
# derivative of ~1e7 that only amplifies rounding noise.
_TAIL_FLOOR = -1e-6


@dataclass(frozen=True)
class TopK:
    """A top-K teacher signal.

    Args:
        ids: LongTensor[..., K] token ids (any integer dtype is accepted).
        logprobs: Tensor[..., K] log-probabilities of those ids under the teacher's
            FULL-vocabulary softmax at the capture temperature. ``-inf`` marks an
            unused slot (contributes nothing).
        tail: optional float32 Tensor[...]: log(1 − Σ_K p_t), the exact tail mass the
            teacher had at capture (a cache stores it in float32). Without it the tail is
            recomputed from ``logprobs``, which loses it when they are stored in float16
            or 8 bits and the teacher is confident (1 − Σ rounds to 0).
    """

    ids: Tensor
    logprobs: Tensor
    tail: Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape:
            raise ValueError(
                f"TopK: ids shape {tuple(self.ids.shape)} != logprobs shape "
                f"{tuple(self.logprobs.shape)}"
            )
        if self.tail is not None and self.tail.shape != self.ids.shape[:-1]:
            raise ValueError(f"TopK: tail shape {tuple(self.tail.shape)} != leading shape {tuple(self.ids.shape[:-1])}")
        if self.ids.dtype.is_floating_point or self.ids.dtype == torch.bool:
            raise ValueError(f"TopK: ids must be an integer tensor, got {self.ids.dtype}")

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def tail_logmass(self) -> Tensor:
        """log(1 − Σ_K p_t) per position, float32 (the stored tail when there is one); ``-inf`` when the
        K ids hold all the mass."""
        if self.tail is not None:
            return self.tail.float()
        return _log1mexp_safe(torch.logsumexp(self.logprobs.float(), dim=-1))

    def select(self, index: Tensor | slice) -> TopK:
        """The positions ``index`` of the leading dimensions (a boolean mask or a slice), tail included."""
        return TopK(self.ids[index], self.logprobs[index], None if self.tail is None else self.tail[index])


# ---------------------------------------------------------------------------
# Safe elementwise helpers. The pattern is always: replace non-finite inputs by
# a harmless value BEFORE the arithmetic (so no inf reaches a gradient), then
# zero the result where the input was not finite.


IGNORE_INDEX = -100  # a target position without a loss (Hugging Face's convention); defined here once


def token_ce(logits: Tensor, targets: Tensor, *, log_probs: Tensor | None = None,
             ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy per position, in float32: ``-log softmax(logits)[target]``, 0 where the target is
    ``ignore_index``. The one cross-entropy of kdkit (the dense and chunked losses, validation, routing).

    Args:
        logits: Tensor[..., V] (any float dtype).
        targets: LongTensor[...] aligned with the logits' leading shape.
        log_probs: the float32 log-softmax of ``logits`` when the caller has it already (it is gathered).
    Returns:
        float32 Tensor[...]."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    if log_probs is not None:
        ce = -torch.gather(log_probs, -1, safe[..., None]).squeeze(-1)
    else:
        v = logits.shape[-1]
        ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, v), safe.reshape(-1),
                                               reduction="none").reshape(safe.shape)
    return torch.where(valid, ce, torch.zeros_like(ce))


@dataclass
class SampledTokens:
    """The teacher's log-prob of each sampled token: all the sampled-token reverse KL needs.

    Args:
        targets: LongTensor[B, T], the sampled tokens (``-100`` where there is no loss).
        logprobs: float32 Tensor[B, T], log p_t(target) under the teacher's full softmax at temperature 1.
    """

    targets: Tensor
    logprobs: Tensor


def sampled_kl_rev(student_logits: Tensor, teacher: SampledTokens) -> Tensor:
    """The sampled-token reverse KL of on-policy distillation, per position, in float32.

    On a token x the student sampled, d = log p_s(x) − log p_t(x) is a one-sample estimate of
    KL(p_s ‖ p_t); its advantage is −d. The value returned is d and its gradient is d · ∇ log p_s(x) (d held
    constant): the score-function gradient of E_{x∼p_s}[log p_s(x) − log p_t(x)], i.e. the policy gradient of
    the per-token reward −d with importance ratio 1 (the samples are the current student's). 0 where the
    target is ``-100``; a teacher log-prob of ``-inf`` is clamped to the float32 minimum's scale (−1e4)."""
    lp_s = -token_ce(student_logits, teacher.targets)
    valid = teacher.targets != IGNORE_INDEX
    lp_t = torch.where(valid, teacher.logprobs.float().clamp(min=-1e4), torch.zeros_like(lp_s))
    d = (lp_s - lp_t).detach()
    return torch.where(valid, d + d * (lp_s - lp_s.detach()), torch.zeros_like(lp_s))


def _finite_or_zero(x: Tensor) -> tuple[Tensor, Tensor]:
    ok = torch.isfinite(x)
    return torch.where(ok, x, torch.zeros_like(x)), ok


def _log1mexp_safe(x: Tensor) -> Tensor:
    """log(1 − e^x) for x ≤ 0, with ``-inf`` (not NaN, not an infinite gradient) near 0."""
    live = x < _TAIL_FLOOR
    xs = torch.where(live, x, torch.full_like(x, -1.0))
    # Two branches for accuracy (Mächler 2012): expm1 near 0, log1p far from it.
    out = torch.where(xs > -0.6931471805599453, torch.log(-torch.expm1(xs)), torch.log1p(-torch.exp(xs)))
    return torch.where(live, out, torch.full_like(out, float("-inf")))


def _all_finite(*xs: Tensor) -> bool:
    """True when every entry is finite, checked on CPU only: there the check is one cheap pass and lets the
    masked passes below be skipped (with the same result, bit for bit); on an accelerator it would cost a
    host synchronisation per call, so the masked path always runs there."""
    # a finite sum means every entry is finite (an inf or NaN entry makes the sum inf or NaN); a sum that
    # overflows from finite entries only sends them down the masked path, which is right for them too
    return all(x.device.type == "cpu" for x in xs) and all(bool(torch.isfinite(x.sum())) for x in xs)


def _log_softmax_safe(logits: Tensor) -> Tensor:
    """float32 log_softmax; a row with no finite logit becomes all ``-inf`` (not NaN)."""
    logits = logits.float()
    if _all_finite(logits):
        return torch.log_softmax(logits, dim=-1)
    row_ok = torch.isfinite(logits).any(dim=-1, keepdim=True)
    safe = torch.where(row_ok, logits, torch.zeros_like(logits))
    lp = torch.log_softmax(safe, dim=-1)
    return torch.where(row_ok, lp, torch.full_like(lp, float("-inf")))


def _kl(a: Tensor, b: Tensor) -> Tensor:
    """Σ e^a (a − b) over the last dim; entries where a or b is -inf are left out."""
    a0, ok_a = _finite_or_zero(a)
    b0, ok_b = _finite_or_zero(b)
    term = torch.exp(a0) * (a0 - b0)
    return torch.where(ok_a & ok_b, term, torch.zeros_like(term)).sum(-1)


def _mix(a: Tensor, b: Tensor, w: float) -> Tensor:
    """log(w·e^a + (1−w)·e^b), finite wherever a or b is (0 < w < 1)."""
    a0, ok_a = _finite_or_zero(a)
    b0, ok_b = _finite_or_zero(b)
    la = torch.where(ok_a, a0 + float(torch.log(torch.tensor(w))), torch.full_like(a0, -1e30))
    lb = torch.where(ok_b, b0 + float(torch.log(torch.tensor(1.0 - w))), torch.full_like(b0, -1e30))
    m = torch.logaddexp(la, lb)
    return torch.where(ok_a | ok_b, m, torch.full_like(m, float("-inf")))


def _kl_plain(a: Tensor, b: Tensor) -> Tensor:
    """:func:`_kl` where every entry of ``a`` and ``b`` is finite (then equal to it bit for bit)."""
    return (torch.exp(a) * (a - b)).sum(-1)


_PLAIN = {"kl_fwd": _kl_plain, "kl_rev": lambda a, b: _kl_plain(b, a)}


def _kl_fwd(a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    return _kl(a, b)


def _kl_rev(a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    return _kl(b, a)


def _teacher_ce(a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    a0, ok_a = _finite_or_zero(a)
    b0, ok_b = _finite_or_zero(b)
    term = -torch.exp(a0) * b0
    return torch.where(ok_a & ok_b, term, torch.zeros_like(term)).sum(-1)


def _jsd(a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    if beta == 0.0:
        return _kl(a, b)
    if beta == 1.0:
        return _kl(b, a)
    m = _mix(a, b, beta)
    return beta * _kl(a, m) + (1.0 - beta) * _kl(b, m)


def _skew_fwd(a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    return _kl(a, _mix(a, b, alpha))


def _skew_rev(a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    return _kl(b, _mix(b, a, alpha))


def _tvd(a: Tensor, b: Tensor, beta: float, alpha: float) -> Tensor:
    a0, ok_a = _finite_or_zero(a)
    b0, ok_b = _finite_or_zero(b)
    pa = torch.where(ok_a, torch.exp(a0), torch.zeros_like(a0))
    pb = torch.where(ok_b, torch.exp(b0), torch.zeros_like(b0))
    both = ok_a & ok_b
    diff = torch.where(both, pa - pb, torch.zeros_like(pa))
    # |x| has a subgradient 0 at 0 in torch (sign(0) = 0): identical inputs give gradient 0.
    return 0.5 * diff.abs().sum(-1)


_Kernel = Callable[[Tensor, Tensor, float, float], Tensor]

KINDS: dict[str, _Kernel] = {
    "kl_fwd": _kl_fwd,
    "kl_rev": _kl_rev,
    "jsd": _jsd,
    "skew_fwd": _skew_fwd,
    "skew_rev": _skew_rev,
    "tvd": _tvd,
    "teacher_ce": _teacher_ce,
}
"""The one registry of divergence kinds. The CLI, the config schema and the tests
enumerate it; ``tests/test_registry_surfaces.py`` fails when a kind is missing from any of them."""

KINDS_WITH_BETA = frozenset({"jsd"})
KINDS_WITH_ALPHA = frozenset({"skew_fwd", "skew_rev"})
TAIL_POLICIES = ("bucket", "renorm")


def validate_divergence_args(kind: str, temperature: float, beta: float, alpha: float, tail: str) -> None:
    """Raise ``ValueError`` naming the bad argument and what would be valid."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if not (temperature > 0.0) or temperature != temperature or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if tail not in TAIL_POLICIES:
        raise ValueError(f"unknown tail policy {tail!r}; valid: {', '.join(TAIL_POLICIES)}")


def _topk_pair(student_logits: Tensor, teacher: TopK, temperature: float, tail: str,
               normalized: bool = False) -> tuple[Tensor, Tensor]:
    """(teacher, student) log-distributions on the support of the teacher's K ids (+ tail)."""
    vocab = student_logits.shape[-1]
    if teacher.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"TopK leading shape {tuple(teacher.ids.shape[:-1])} does not match student "
            f"logits leading shape {tuple(student_logits.shape[:-1])}"
        )
    if teacher.k > vocab:
        raise ValueError(f"TopK has K={teacher.k} ids but the student vocabulary has V={vocab}")
    ids = teacher.ids.long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"TopK ids out of range: min {int(ids.min())}, max {int(ids.max())}, vocabulary size {vocab}"
        )
    s_lp = student_logits.float() if normalized else _log_softmax_safe(student_logits.float() / temperature)
    b = torch.gather(s_lp, -1, ids)
    a = teacher.logprobs.float()
    # A slot the teacher marked unused must not count on the student side either.
    b = torch.where(torch.isfinite(a), b, torch.full_like(b, float("-inf")))
    if tail == "renorm":
        return _renorm(a), _renorm(b)
    a_tail = teacher.tail_logmass().unsqueeze(-1)
    b_tail = _log1mexp_safe(torch.logsumexp(b, dim=-1)).unsqueeze(-1)
    return torch.cat([a, a_tail], dim=-1), torch.cat([b, b_tail], dim=-1)


def _renorm(x: Tensor) -> Tensor:
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    lse0, ok = _finite_or_zero(lse)
    return torch.where(ok, x - lse0, torch.full_like(x, float("-inf")))


def token_divergence(
    student_logits: Tensor,
    teacher: Tensor | TopK,
    kind: str,
    *,
    temperature: float = 1.0,
    t2_scale: bool = True,
    beta: float = 0.5,
    alpha: float = 0.1,
    tail: str = "bucket",
    normalized: bool = False,
) -> Tensor:
    """Divergence between teacher and student at every position.

    Args:
        student_logits: Tensor[..., V], any float dtype. Divided by ``temperature``.
        teacher: dense logits Tensor[..., V] (divided by ``temperature``) or a
            :class:`TopK` whose log-probs are already at the capture temperature
            (only the student side is divided by ``temperature``).
        kind: a key of :data:`KINDS`.
        temperature: T > 0.
        t2_scale: multiply the result by T² (keeps gradient scale independent of T).
        beta: β ∈ [0, 1] for ``jsd``.
        alpha: α ∈ (0, 1) for ``skew_fwd`` / ``skew_rev``.
        tail: top-K tail policy, ``"bucket"`` (K+1 outcomes, the last one the tail
            mass) or ``"renorm"`` (both renormalised over the K ids).
        normalized: ``student_logits`` are already the student's float32 log-probs at this
            temperature (a caller that computed them for CE too, at T = 1): not normalised again.

    Returns:
        float32 Tensor[...] — one value per position, no reduction.
    """
    validate_divergence_args(kind, temperature, beta, alpha, tail)
    if normalized and temperature != 1.0:
        raise ValueError("normalized student log-probs are taken at temperature 1")
    if isinstance(teacher, TopK):
        a, b = _topk_pair(student_logits, teacher, temperature, tail, normalized)
    else:
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"dense teacher logits shape {tuple(teacher.shape)} != student logits shape "
                f"{tuple(student_logits.shape)}"
            )
        a = _log_softmax_safe(teacher.float() / temperature)
        b = student_logits.float() if normalized else _log_softmax_safe(student_logits.float() / temperature)
    if kind in _PLAIN and _all_finite(a, b):  # nothing masked: the same values without the masked passes
        out = _PLAIN[kind](a, b)
        return out * (temperature * temperature) if t2_scale else out
    # An entry that either side masks (-inf) leaves the support of BOTH distributions,
    # so every kind agrees on what "masked" means (and a fully masked position gives 0).
    both = torch.isfinite(a) & torch.isfinite(b)
    neg_inf = torch.full_like(a, float("-inf"))
    a, b = torch.where(both, a, neg_inf), torch.where(both, b, neg_inf)
    out = KINDS[kind](a, b, beta, alpha)
    if t2_scale:
        out = out * (temperature * temperature)
    return out


# ---------------------------------------------------------------------------
# Aggregation over positions


def _agg_sum(v: Tensor, m: Tensor) -> Tensor:
    return torch.where(m, v, torch.zeros_like(v)).sum()


def _agg_mean(v: Tensor, m: Tensor) -> Tensor:
    n = m.sum()
    return _agg_sum(v, m) / n.clamp(min=1).to(v.dtype)


def _agg_rmse(v: Tensor, m: Tensor) -> Tensor:
    n = m.sum()
    sq = torch.where(m, v * v, torch.zeros_like(v)).sum() / n.clamp(min=1).to(v.dtype)
    r = torch.sqrt(sq + RMSE_EPS)
    return torch.where(n > 0, r, torch.zeros_like(r))


def _agg_p95(v: Tensor, m: Tensor) -> Tensor:
    sel = v[m]
    if sel.numel() == 0:
        return (v * 0).sum()
    # Linear interpolation between order statistics, as numpy.percentile's default.
    return torch.quantile(sel, 0.95)


def _agg_max(v: Tensor, m: Tensor) -> Tensor:
    sel = v[m]
    if sel.numel() == 0:
        return (v * 0).sum()
    return sel.max()


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mean": _agg_mean,
    "sum": _agg_sum,
    "rmse": _agg_rmse,
    "p95": _agg_p95,
    "max": _agg_max,
}
"""The one registry of aggregations over positions."""


def aggregate(values: Tensor, mask: Tensor, how: str) -> Tensor:
    """Aggregate per-position values over the positions where ``mask`` is True.

    Args:
        values: Tensor[...] any float dtype; computed in float32.
        mask: BoolTensor of the same shape.
        how: ``mean`` | ``sum`` | ``rmse`` (√(mean x² + ε)) | ``p95`` | ``max``.

    Returns:
        float32 scalar. An all-False mask gives 0 with gradient 0 for every ``how``.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; valid: {', '.join(AGGREGATIONS)}")
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    v = values.float()
    # Masked-out positions may hold inf/NaN (e.g. padding); keep them out of every gradient.
    v = torch.where(mask.bool(), v, torch.zeros_like(v))
    return AGGREGATIONS[how](v, mask.bool())


def hinge(value: Tensor, tau: float) -> Tensor:
    """relu(value − τ): zero (and zero gradient) below the threshold τ."""
    return torch.relu(value.float() - tau)
