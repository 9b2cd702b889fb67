"""Batch + teacher/reference signals + config → (loss, metrics). The ONLY place that normalises.

    total = ce_coef · CE  +  kd_weight · Σ_tok w(row) · KD(tok)  +  barrier

* CE and KD are sums over target tokens divided by ONE denominator: the (weighted)
  number of target tokens of the whole optimizer step — every micro-batch, every
  rank. The caller computes it with :func:`step_denominator` (and all-reduces it
  when distributed), so batch 8 × accumulation 1 equals batch 2 × accumulation 4.
* ``w(row) = row weight × task_weights[task]``; the row weight also scales CE.
* Per-role switches (``ObjectiveConfig.roles``) decide which rows carry CE, KD
  and the barrier: the seeds put KD on ``anchor`` rows only.
* The barrier is λ_b · relu(aggregate(div(reference, student)) − τ), computed per
  micro-batch (an RMSE or a p95 does not decompose over micro-batches) and
  weighted by the micro-batch's share of the step's tokens.

Positions are prediction positions: ``student_logits[b, t]`` predicts
``targets[b, t]``; the caller has already shifted (``logits[:, :-1]``,
``labels[:, 1:]``). ``targets == -100`` marks positions without a loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import Tensor

from kdkit.config.schema import ObjectiveConfig
from kdkit.loss.crosstok import CrossTeacher, CrossTopK, cross_divergence, cross_topk_divergence
from kdkit.loss.divergences import (
    IGNORE_INDEX,
    SampledTokens,
    TopK,
    aggregate,
    hinge,
    sampled_kl_rev,
    token_ce,
    token_divergence,
)
from kdkit.teacher.signals import Signals
from kdkit.train.hidden import HiddenDistill

DEFAULT_ROLE = "default"


@dataclass(frozen=True)
class StepDenominator:
    """Σ of CE token weights over the whole optimizer step (all micro-batches and ranks)."""

    tokens: float

    def __post_init__(self) -> None:
        if not self.tokens >= 0:
            raise ValueError(f"step denominator must be >= 0, got {self.tokens}")


# (metric, its sum, its count): every mean the objective reports is one of these sums ÷ its count
_MEANS = (("ce_loss", "ce", "tok"), ("kl_loss", "kl", "kd_tok"), ("tail_mass", "tail", "tail_tok"),
          ("top1_agree", "agree", "agree_tok"), ("hidden_loss", "hidden", "hidden_tok"))
BARRIER_VIEWS = ("mean", "rmse", "p95", "max")  # logged per step as barrier_div_<how>: the micro-batches' mean
_MEANS += tuple((f"barrier_div_{how}", f"bdiv_{how}", "bdiv_n") for how in BARRIER_VIEWS)
SUM_KEYS = ("total", "ce", "tok", "kl", "kd_tok", "barrier", "tail", "tail_tok", "agree", "agree_tok", "hidden",
            "hidden_tok")


def means(sums: dict[str, Any], steps: float = 1.0) -> dict[str, Any]:
    """The one place sums become means: each metric's sum ÷ its count (target tokens, KD positions, ...);
    the loss and the barrier ÷ the number of optimizer steps summed.

    On a micro-batch's 0-dim tensors a metric is there when its term ran; on floats (a step's or an
    epoch's sums, reduced) when its count is positive (the CE mean always)."""
    out = {"total_loss": sums["total"] / steps}
    if "barrier" in sums:
        out["barrier"] = sums["barrier"] / steps
    routed = sorted({k.split("@", 1)[1] for k in sums if "@" in k})  # several teachers: "kl@name", ...
    for name, num, den in _MEANS:
        for suffix in ("", *(f"@{r}" for r in routed)):
            if den + suffix not in sums:
                continue
            count = sums[den + suffix]
            if torch.is_tensor(count):
                out[name + suffix] = sums[num + suffix] / count.clamp(min=1)
            elif count > 0 or name == "ce_loss":
                out[name + suffix] = sums[num + suffix] / max(count, 1.0)
    return out


@dataclass
class Term:
    """One term of a micro-batch's objective: its share of the step's loss (with its graph) and the sums
    its metrics are made of (0-dim tensors on the loss's device, keys of :data:`SUM_KEYS`)."""

    name: str
    loss: Tensor
    sums: dict[str, Tensor]
    extra: dict[str, Tensor] = field(default_factory=dict)  # per micro-batch values (the barrier's aggregate)


@dataclass
class ObjectiveOutput:
    """A micro-batch's loss, its terms and their metric sums. ``metrics`` are the means (and counts), as
    0-dim tensors on the loss's device (a training step adds the sums there and reads them once);
    :meth:`floats` reads them all at once."""

    loss: Tensor
    sums: dict[str, Tensor] = field(default_factory=dict)
    terms: dict[str, Tensor] = field(default_factory=dict)  # each term's loss, with its graph (dense: ce, kd, ...)
    extra: dict[str, Tensor] = field(default_factory=dict)  # per micro-batch values: the barrier's aggregate

    @property
    def metrics(self) -> dict[str, Tensor]:
        m = means(self.sums)
        m.update({name: self.sums[key] for name, key in (("tokens", "tok"), ("kd_tokens", "kd_tok"),
                                                           ("hidden_tokens", "hidden_tok")) if key in self.sums})
        return {**m, **self.extra}

    def floats(self) -> dict[str, float]:
        metrics = self.metrics
        values = torch.stack([v.detach().double() for v in metrics.values()]).tolist() if metrics else []
        return dict(zip(metrics, values, strict=True))


def _combine(terms: list[Term]) -> ObjectiveOutput:
    """The micro-batch's loss: its terms added in order; their sums and extras merged, with the total."""
    loss, sums, extra = terms[0].loss, dict(terms[0].sums), dict(terms[0].extra)
    for t in terms[1:]:
        loss = loss + t.loss
        for k, v in t.sums.items():
            sums[k] = sums[k] + v if k in sums else v
        extra.update(t.extra)
    sums["total"] = _f(loss)
    return ObjectiveOutput(loss=loss, sums=sums, terms={t.name: t.loss for t in terms}, extra=extra)


def _f(x: Tensor) -> Tensor:
    """A metric: detached, float32, left on its device."""
    return x.detach().float()


def token_weights(targets: Tensor, ce_norm: str) -> Tensor:
    """float32 [B, T] weight of each target token in the CE/KD sums (0 where ignored).

    ``token``: 1 per target token. ``sqrt_row``: 1/√n_row, so a long completion
    does not outweigh a short one by its length alone (the seeds' token-weighted CE).
    """
    valid = (targets != IGNORE_INDEX).float()
    if ce_norm == "token":
        return valid
    if ce_norm == "sqrt_row":
        n = valid.sum(dim=-1, keepdim=True)
        return valid / torch.sqrt(n.clamp(min=1.0))
    raise ValueError(f"unknown ce_norm {ce_norm!r}; valid: token, sqrt_row")


def step_denominator(micro_batch_targets: list[Tensor], cfg: ObjectiveConfig) -> StepDenominator:
    """Denominator for one optimizer step from the targets of its micro-batches (this rank)."""
    total = sum(float(token_weights(t, cfg.ce_norm).sum()) for t in micro_batch_targets)
    return StepDenominator(tokens=total)


def _check_targets(targets: Tensor, vocab: int) -> Tensor:
    """The mask of target positions, after checking every target id is a vocabulary row."""
    valid = targets != IGNORE_INDEX
    if valid.any() and (int(targets[valid].min()) < 0 or int(targets[valid].max()) >= vocab):
        raise ValueError(f"target ids out of range [0, {vocab})")
    return valid


def _row_vector(values: list[str] | None, n: int, default: str, what: str) -> list[str]:
    if values is None:
        return [default] * n
    if len(values) != n:
        raise ValueError(f"{what}: got {len(values)} entries for a batch of {n} rows")
    return [v if v else default for v in values]


@dataclass
class _Coefficients:
    valid: Tensor
    n_valid: Tensor  # float32, on the device
    tok_w: Tensor
    rw: Tensor
    ce_on: Tensor
    kd_on: Tensor
    task_w: Tensor
    bar_on: Tensor
    local: Tensor
    inv: Tensor | float
    step_share: bool  # the barrier weighted by the micro-batch's share of the step's tokens (a step's denominator)


def coefficients(targets: Tensor, cfg: ObjectiveConfig, roles: list[str] | None, tasks: list[str] | None,
                  row_weights: Tensor | None, denom: StepDenominator | None, device: torch.device) -> _Coefficients:
    """Per-row switches and per-token weights shared by the dense and the chunked paths."""
    bsz = targets.shape[0]
    role_list = _row_vector(roles, bsz, DEFAULT_ROLE, "roles")
    task_list = _row_vector(tasks, bsz, "", "tasks")
    rw = torch.ones(bsz, device=device) if row_weights is None else row_weights.float().to(device)
    if rw.shape != (bsz,):
        raise ValueError(f"row_weights shape {tuple(rw.shape)} != ({bsz},)")
    terms = [cfg.terms_for(r) for r in role_list]
    valid = targets != IGNORE_INDEX
    tok_w = token_weights(targets, cfg.ce_norm)
    local = tok_w.sum()
    if denom is None:  # this micro-batch alone: 1 / its weight (0 when it has none), on the device
        inv: Tensor | float = torch.where(local > 0, 1.0 / local.clamp(min=1e-30), torch.zeros_like(local))
    else:
        inv = 1.0 / denom.tokens if denom.tokens > 0 else 0.0
    return _Coefficients(
        valid=valid, n_valid=valid.sum().float(), tok_w=tok_w, rw=rw,
        ce_on=torch.tensor([t.ce for t in terms], dtype=torch.float32, device=device),
        kd_on=torch.tensor([t.kd for t in terms], dtype=torch.float32, device=device),
        task_w=torch.tensor([cfg.task_weights.get(t, 1.0) for t in task_list], dtype=torch.float32, device=device),
        bar_on=torch.tensor([t.barrier for t in terms], dtype=torch.bool, device=device),
        local=local, inv=inv, step_share=denom is not None,
    )


def ce_term(logits32: Tensor, targets: Tensor, co: _Coefficients, cfg: ObjectiveConfig) -> Term:
    """``ce_coef`` · Σ_tok w · CE(tok) ÷ the step's denominator (the one cross-entropy of the dense path)."""
    ce_pos = token_ce(logits32, targets)
    loss = cfg.ce_coef * (ce_pos * co.tok_w * (co.rw * co.ce_on)[:, None]).sum() * co.inv
    return Term("ce", loss, {"ce": _f(ce_pos.sum()), "tok": co.n_valid})


def kd_term(logits32: Tensor, teacher: Tensor | TopK | CrossTeacher | CrossTopK, co: _Coefficients,
            cfg: ObjectiveConfig) -> Term:
    """``kd_weight`` · Σ_tok w(row) · KD(tok) ÷ the step's denominator, over the KD positions."""
    k = cfg.kd
    kd_mask = co.valid & (co.kd_on[:, None] > 0)
    if isinstance(teacher, SampledTokens):  # on-policy, the sampled-token reverse KL
        div = sampled_kl_rev(logits32, teacher)
    elif isinstance(teacher, CrossTeacher | CrossTopK):  # another tokenizer: values at the aligned positions
        fn = cross_divergence if isinstance(teacher, CrossTeacher) else cross_topk_divergence
        div, aligned = fn(logits32, teacher, k.kind, k.temperature, k.t2_scale, k.beta, k.alpha)
        kd_mask = kd_mask & aligned
    else:
        div = token_divergence(logits32, teacher, k.kind, temperature=k.temperature, t2_scale=k.t2_scale,
                               beta=k.beta, alpha=k.alpha, tail=k.tail)
    row_kd = co.rw * co.task_w * co.kd_on
    div = torch.where(kd_mask, div, torch.zeros_like(div))
    loss = cfg.kd_weight * (div * co.tok_w * row_kd[:, None]).sum() * co.inv
    return Term("kd", loss, kd_sums(div.detach(), logits32.detach().argmax(-1), teacher, kd_mask))


def routed_kd_terms(logits32: Tensor, teacher: Tensor | TopK, teachers: dict[str, Tensor | TopK],
                    row_teachers: list[str], co: _Coefficients, cfg: ObjectiveConfig) -> list[Term]:
    """One KD term per teacher over the rows that name it (the default teacher: the rows that name none);
    each term's sums also under "<sum>@<name>" ("@teacher" for the default), for per-teacher metrics. Every
    teacher's term is made, with or without rows, so every micro-batch has the same sums."""
    out = []
    for name, signal in (("", teacher), *teachers.items()):
        mine = torch.tensor([rt == name for rt in row_teachers], dtype=co.kd_on.dtype, device=co.kd_on.device)
        term = kd_term(logits32, signal, replace(co, kd_on=co.kd_on * mine), cfg)
        label = name or "teacher"
        term.sums.update({f"{k}@{label}": v for k, v in list(term.sums.items())})
        term.name = f"kd@{name}" if name else "kd"
        out.append(term)
    return out


def barrier_term(logits32: Tensor, reference: Tensor | TopK, co: _Coefficients, cfg: ObjectiveConfig) -> Term:
    """λ_b · relu(aggregate(div(reference, student)) − τ), weighted by the micro-batch's share of the step's
    tokens (an RMSE or a p95 does not decompose over micro-batches); the aggregate itself in its ``extra``."""
    b = cfg.barrier
    div_ref = token_divergence(logits32, reference, b.kind, temperature=b.temperature, t2_scale=False)
    mask = co.valid & co.bar_on[:, None]
    agg = aggregate(div_ref, mask, b.aggregate)
    barrier = b.weight * hinge(agg, b.tau) * (co.local * co.inv if co.step_share else 1.0)
    # every aggregate of the divergence, before the hinge: how far below τ a run sits shows in its logs
    seen = mask.any().float()
    sums = {"barrier": _f(barrier), "bdiv_n": seen,
            **{f"bdiv_{how}": _f(aggregate(div_ref.detach(), mask, how)) * seen for how in BARRIER_VIEWS}}
    return Term("barrier", barrier, sums, {"barrier_agg": _f(agg)})


def _hidden_term(values: Tensor, co: _Coefficients, cfg: ObjectiveConfig) -> Term:
    """``hidden.weight`` · Σ_tok w(row) · values(tok) ÷ the step's denominator, over the KD positions."""
    row = co.rw * co.task_w * co.kd_on
    mask = co.valid & (co.kd_on[:, None] > 0)
    v = torch.where(mask, values.float(), torch.zeros_like(values, dtype=torch.float32))
    loss = cfg.hidden.weight * (v * co.tok_w * row[:, None]).sum() * co.inv
    return Term("hidden", loss, {"hidden": _f(v.sum()), "hidden_tok": mask.sum().float()})


@torch.no_grad()
def kd_sums(div: Tensor, student_top: Tensor, teacher: Tensor | TopK, mask: Tensor) -> dict[str, Tensor]:
    """The sums of the KD statistics over the KD positions ``mask`` (targets whose row's role has KD on,
    whatever their weight): the divergence, the count, the top-1 agreements and the teacher's tail mass
    (top-K only). The one place both loss paths compute them. Shapes: ``div``, ``student_top``, ``mask``
    alike ([B, T] or [N]); ``teacher`` aligned with them."""
    n = mask.sum().float()
    out = {"kl": _f(torch.where(mask, div, 0.0).sum()), "kd_tok": n}
    if isinstance(teacher, CrossTeacher | CrossTopK | SampledTokens):  # no top-1 agreement, no top-K tail
        return out
    if isinstance(teacher, TopK):
        best = teacher.logprobs.float().argmax(dim=-1, keepdim=True)
        t_top = torch.gather(teacher.ids.long(), -1, best).squeeze(-1)
        out.update(tail=_f(torch.where(mask, torch.exp(teacher.tail_logmass()), 0.0).sum()), tail_tok=n)
    else:
        t_top = teacher.float().argmax(dim=-1)
    out.update(agree=_f(((student_top == t_top) & mask).sum()), agree_tok=n)
    return out


def resolved_chunk(chunk_size: int | str, vocab: int) -> int:
    """``objective.chunk_size`` as a number of positions (``auto``: from the vocabulary)."""
    from kdkit.loss.chunked import auto_chunk

    return auto_chunk(vocab) if chunk_size == "auto" else int(chunk_size)

def fused_term(x: Inputs, co: _Coefficients, cfg: ObjectiveConfig, at_targets: bool) -> Term:
    """CE and KD in one pass over the target positions, chunk by chunk from the final hidden states and the LM
    head (:func:`kdkit.loss.chunked.chunked_ce_kd`): the two terms share each chunk's logits. ``at_targets``:
    the teacher was asked at the target positions alone, row-major ([N, V] / TopK [N, K])."""
    from kdkit.loss.chunked import KDSpec, chunked_ce_kd

    sel, teacher = co.valid, x.signals.teacher
    ce_w = (co.tok_w * (co.rw * co.ce_on)[:, None])[sel] * (cfg.ce_coef * co.inv)
    kd_row = co.rw * co.task_w * co.kd_on
    use_kd = teacher is not None and cfg.kd_weight > 0.0
    kd_w = (co.tok_w * kd_row[:, None])[sel] * (cfg.kd_weight * co.inv) if use_kd else None
    t_sel: Tensor | TopK | None = None
    if use_kd and at_targets:
        n_t = (teacher.ids if isinstance(teacher, TopK) else teacher).shape[0]
        if n_t != int(sel.sum()):
            raise ValueError(f"the teacher has {n_t} target positions, the batch {int(sel.sum())}")
        t_sel = teacher
    elif use_kd:
        t_sel = teacher.select(sel) if isinstance(teacher, TopK) else teacher[sel]
    k = cfg.kd
    spec = KDSpec(kind=k.kind, temperature=k.temperature, t2_scale=k.t2_scale, beta=k.beta, alpha=k.alpha, tail=k.tail)
    vocab = x.head_weight.shape[0]
    loss, st = chunked_ce_kd(x.last_hidden[sel], x.head_weight, x.targets[sel], bias=x.head_bias, teacher=t_sel,
                             ce_weights=ce_w, kd_weights=kd_w, spec=spec,
                             chunk_size=resolved_chunk(cfg.chunk_size, vocab))
    sums = {"ce": _f(st.ce_sum), "tok": co.n_valid}
    if use_kd:
        kd_mask = (co.kd_on[:, None] > 0).expand_as(sel)[sel]
        sums.update(kd_sums(st.kd_div, st.student_top, t_sel, kd_mask))
    return Term("ce+kd", loss, sums)


@dataclass(frozen=True)
class Needs:
    """What an objective's terms read of a micro-batch. Of the student: its logits at the prediction
    positions (``logits``), or its final hidden states and LM head (``head``: the chunked loss runs the head
    itself), and every layer's hidden states (``states``). Of the KD teacher: its answer at the target
    positions alone (``teacher_at_targets``), its hidden states at ``teacher_layers`` from the same forward,
    or its log-prob of each sampled token (``sampled``)."""

    logits: bool = False
    head: bool = False
    states: bool = False
    teacher_at_targets: bool = False
    teacher_layers: tuple[int, ...] = ()
    sampled: bool = False

    def __or__(self, other: Needs) -> Needs:
        flags = {f: getattr(self, f) or getattr(other, f) for f in ("logits", "head", "states", "teacher_at_targets",
                                                                    "sampled")}
        return Needs(**flags, teacher_layers=tuple(sorted({*self.teacher_layers, *other.teacher_layers})))


@dataclass(frozen=True)
class Inputs:
    """One micro-batch as the terms read it: the targets [B, T] (``-100``: no loss), the rows' roles, tasks,
    weights and teachers, the sources' :class:`~kdkit.teacher.signals.Signals`, and the student's outputs its
    terms need: ``logits`` [B, T, V] over the real vocabulary, or ``last_hidden`` [B, T, H] with the LM head
    (``head_weight`` [V, H], ``head_bias`` [V]); ``states``, every layer's hidden states [B, T + 1, H] (the
    last input kept: :class:`~kdkit.train.hidden.HiddenDistill` drops it); ``hidden_values`` [B, T], a
    hidden-state loss computed by the caller."""

    targets: Tensor
    signals: Signals = field(default_factory=Signals)
    roles: list[str] | None = None
    tasks: list[str] | None = None
    row_weights: Tensor | None = None
    row_teachers: list[str] | None = None
    logits: Tensor | None = None
    last_hidden: Tensor | None = None
    head_weight: Tensor | None = None
    head_bias: Tensor | None = None
    states: tuple[Tensor, ...] | None = None
    hidden_values: Tensor | None = None


class LossTerm(Protocol):
    """One term of the objective, chosen once (:meth:`Objective.build`): what it reads, and its :class:`Term`
    (or several, or none) for a micro-batch. A new term is a class here and a line in :meth:`Objective.build`;
    the step asks for what ``needs`` names and does not know the terms."""

    needs: Needs

    def __call__(self, x: Inputs, co: _Coefficients, cfg: ObjectiveConfig) -> list[Term]: ...


@dataclass(frozen=True)
class CE:
    """The cross-entropy on the targets (always made: its metrics are logged even at ``ce_coef`` 0)."""

    needs: Needs = Needs(logits=True)

    def __call__(self, x: Inputs, co: _Coefficients, cfg: ObjectiveConfig) -> list[Term]:
        return [ce_term(x.logits, x.targets, co, cfg)]


@dataclass(frozen=True)
class KD:
    """The KD term against the teacher's answer (none when there is none); one per teacher when rows name
    teachers; on a ``sampled`` on-policy step, the sampled-token reverse KL."""

    sampled: bool = False

    @property
    def needs(self) -> Needs:
        return Needs(logits=True, sampled=self.sampled)

    def __call__(self, x: Inputs, co: _Coefficients, cfg: ObjectiveConfig) -> list[Term]:
        s = x.signals
        if s.teacher is None:
            return []
        if s.teachers:
            return routed_kd_terms(x.logits, s.teacher, s.teachers, x.row_teachers or [""] * len(co.rw), co, cfg)
        return [kd_term(x.logits, s.teacher, co, cfg)]


@dataclass(frozen=True)
class Barrier:
    """The KL barrier against the reference (``objective.barrier``)."""

    needs: Needs = Needs(logits=True)

    def __call__(self, x: Inputs, co: _Coefficients, cfg: ObjectiveConfig) -> list[Term]:
        if x.signals.reference is None:
            raise ValueError("objective.barrier is set but no reference signal was given")
        return [barrier_term(x.logits, x.signals.reference, co, cfg)]


@dataclass(frozen=True)
class Hidden:
    """The hidden-state term: from the student's and the teacher's states through the run's projections
    (``module``), or from values the caller computed (``module`` None: ``Inputs.hidden_values``)."""

    module: HiddenDistill | None = None

    @property
    def needs(self) -> Needs:
        return Needs() if self.module is None else Needs(states=True, teacher_layers=self.module.teacher_layers)

    def __call__(self, x: Inputs, co: _Coefficients, cfg: ObjectiveConfig) -> list[Term]:
        values = x.hidden_values if self.module is None else self.module(x.states, x.signals.teacher_hidden)
        return [_hidden_term(values, co, cfg)]


@dataclass(frozen=True)
class FusedCEKD:
    """CE and KD in one chunked pass (:func:`fused_term`), never holding more than ``chunk_size`` × V logits."""

    at_targets: bool = False

    @property
    def needs(self) -> Needs:
        return Needs(head=True, teacher_at_targets=self.at_targets)

    def __call__(self, x: Inputs, co: _Coefficients, cfg: ObjectiveConfig) -> list[Term]:
        return [fused_term(x, co, cfg, self.at_targets)]


@dataclass(frozen=True)
class Objective:
    """The objective's terms, chosen once (a run builds its objectives when it starts), and their sum on each
    micro-batch: the coefficients computed once per micro-batch, each term's loss added in order."""

    cfg: ObjectiveConfig
    terms: tuple[LossTerm, ...]

    @classmethod
    def build(cls, cfg: ObjectiveConfig, *, chunked: bool = False, teacher_at_targets: bool = False,
              hidden: HiddenDistill | bool = False, sampled: bool = False) -> Objective:
        """The terms ``cfg`` asks for: CE, KD (``kd_weight`` > 0), the barrier, the hidden-state term
        (``hidden``: the run's projections, or True for values the caller gives); ``chunked``: CE and KD
        fused from the LM head (no barrier), the teacher asked ``teacher_at_targets``; ``sampled``: KD is
        the sampled-token reverse KL of an on-policy step."""
        if chunked and cfg.barrier is not None:
            raise ValueError("the chunked path has no barrier; use chunk_size: 0 with a barrier")
        if chunked and cfg.chunk_size != "auto" and cfg.chunk_size < 1:
            raise ValueError("objective.chunk_size must be >= 1 or 'auto' for the chunked path")
        terms: list[LossTerm] = [FusedCEKD(teacher_at_targets)] if chunked else [CE()]
        if not chunked and cfg.kd_weight > 0.0:
            terms.append(KD(sampled))
        if cfg.barrier is not None:
            terms.append(Barrier())
        if hidden is not False:
            terms.append(Hidden(None if hidden is True else hidden))
        return cls(cfg, tuple(terms))

    @classmethod
    def for_run(cls, cfg: ObjectiveConfig, chunked: bool, hidden: HiddenDistill | None,
                sampled: bool = False) -> Objective:
        """A run's objective: chunked when the run can be (not on a ``sampled`` step: the teacher's log-prob of
        each token is per position), the teacher then asked at the targets alone unless hidden states are
        distilled (they come from the teacher's whole forward)."""
        chunked = chunked and not sampled
        return cls.build(cfg, chunked=chunked, teacher_at_targets=chunked and hidden is None,
                         hidden=False if hidden is None else hidden, sampled=sampled)

    @functools.cached_property
    def needs(self) -> Needs:
        return functools.reduce(Needs.__or__, (t.needs for t in self.terms), Needs())

    @property
    def chunked(self) -> bool:
        return self.needs.head

    def __call__(self, x: Inputs, denom: StepDenominator | None = None) -> ObjectiveOutput:
        """The micro-batch's loss: every term's, added in order (``denom``: the optimizer step's; default: this
        micro-batch alone)."""
        scores = x.last_hidden if self.chunked else x.logits
        if scores is None or scores.dim() != 3:
            what = "hidden" if self.chunked else "student_logits"
            raise ValueError(f"{what} must be [B, T, {'H' if self.chunked else 'V'}], got shape "
                             f"{None if scores is None else tuple(scores.shape)}")
        bsz, seq = scores.shape[:2]
        if x.targets.shape != (bsz, seq):
            what = "hidden" if self.chunked else "logits"
            raise ValueError(f"targets shape {tuple(x.targets.shape)} != {what} leading shape {(bsz, seq)}")
        _check_targets(x.targets, x.head_weight.shape[0] if self.chunked else scores.shape[-1])
        if not self.chunked:
            x = replace(x, logits=scores.float())  # the divergence math in float32, converted once
        co = coefficients(x.targets, self.cfg, x.roles, x.tasks, x.row_weights, denom, scores.device)
        return _combine([t for term in self.terms for t in term(x, co, self.cfg)])


def compute_objective(
    student_logits: Tensor,
    targets: Tensor,
    cfg: ObjectiveConfig,
    *,
    teacher: Tensor | TopK | None = None,
    teachers: dict[str, Tensor | TopK] | None = None,
    row_teachers: list[str] | None = None,
    reference: Tensor | TopK | None = None,
    hidden: Tensor | None = None,
    roles: list[str] | None = None,
    tasks: list[str] | None = None,
    row_weights: Tensor | None = None,
    denom: StepDenominator | None = None,
) -> ObjectiveOutput:
    """The objective of one micro-batch: its terms (CE, KD, the barrier, the hidden-state term), added.

    Args:
        student_logits: Tensor[B, T, V] (any float dtype; math in float32).
        targets: LongTensor[B, T], ``-100`` where there is no loss.
        cfg: the objective configuration.
        teacher: dense logits Tensor[B, T, V] or TopK[B, T, K] aligned with the
            positions, or a :class:`~kdkit.loss.crosstok.CrossTeacher` (another tokenizer: KD at its aligned
            positions only); ``None`` for no KD (plain SFT).
        teachers, row_teachers: more teachers by name, and each row's teacher name ("" = ``teacher``): a
            row's KD is from its own teacher; the KD sums are also kept per teacher ("kl@name", ...).
        reference: the barrier's reference, dense or TopK; required iff
            ``cfg.barrier`` is set.
        hidden: float Tensor[B, T], the per-position hidden-state loss (``cfg.hidden``), or None.
        roles, tasks: per-row strings (length B); missing means ``"default"`` / ``""``.
        row_weights: float Tensor[B] per-row weights (default 1).
        denom: the optimizer step's denominator; default: this micro-batch alone.

    Returns:
        ObjectiveOutput with ``loss`` (float32 scalar, this micro-batch's share of
        the step loss), its terms, their sums, and the means: ``ce_loss`` (CE per target token),
        ``kl_loss`` (KD divergence per KD position), ``barrier``, ``barrier_agg`` (the aggregate
        before the hinge), ``total_loss``, ``tail_mass`` and ``top1_agree`` (with a teacher), ``tokens``.
    """
    objective = Objective.build(cfg, hidden=hidden is not None)
    signals = Signals(teacher=teacher, reference=reference, teachers=teachers or {})
    return objective(Inputs(targets, signals, roles, tasks, row_weights, row_teachers, logits=student_logits,
                            hidden_values=hidden), denom)


def compute_objective_chunked(
    hidden: Tensor,
    head_weight: Tensor,
    targets: Tensor,
    cfg: ObjectiveConfig,
    *,
    head_bias: Tensor | None = None,
    teacher: Tensor | TopK | None = None,
    roles: list[str] | None = None,
    tasks: list[str] | None = None,
    row_weights: Tensor | None = None,
    denom: StepDenominator | None = None,
    teacher_at_targets: bool = False,
    hidden_values: Tensor | None = None,
) -> ObjectiveOutput:
    """:func:`compute_objective` (without the barrier) from final hidden states [B, T, H] and the LM head,
    never holding more than ``cfg.chunk_size`` × V logits. Only target positions are computed at all.
    ``teacher_at_targets``: the teacher is given at the target positions only, row-major ([N, V] / TopK [N, K]).
    ``hidden_values``: the hidden-state term's per-position values [B, T], as in :func:`compute_objective`."""
    objective = Objective.build(cfg, chunked=True, teacher_at_targets=teacher_at_targets,
                                hidden=hidden_values is not None)
    return objective(Inputs(targets, Signals(teacher=teacher), roles, tasks, row_weights, last_hidden=hidden,
                            head_weight=head_weight, head_bias=head_bias, hidden_values=hidden_values), denom)


def hidden_term(values: Tensor, targets: Tensor, cfg: ObjectiveConfig, *, roles: list[str] | None = None,
                tasks: list[str] | None = None, row_weights: Tensor | None = None,
                denom: StepDenominator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The hidden-state term alone: ``cfg.hidden.weight`` · Σ_tok w(row) · values(tok) ÷ the step's
    denominator, over the KD positions (targets of rows whose role has KD on), weighted like KD.

    Args:
        values: float Tensor[B, T], the per-position hidden-state loss summed over the layer pairs.
        targets: LongTensor[B, T] (``-100``: no loss).
    Returns:
        (term, {"hidden_loss": mean of ``values`` over the KD positions, "hidden_tokens": their count})."""
    co = coefficients(targets, cfg, roles, tasks, row_weights, denom, values.device)
    t = _hidden_term(values, co, cfg)
    n = t.sums["hidden_tok"]
    return t.loss, {"hidden_loss": t.sums["hidden"] / n.clamp(min=1), "hidden_tokens": n}
