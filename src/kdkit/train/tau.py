"""Proposing the barrier's τ from the reference's statistics at step 0 (``kdkit barrier tau``).

At step 0 a barrier to the base sits at 0: the student is its reference. What sets the scale is how far
the data asks the student to move. Per position, the least divergence (of the barrier's kind, at its
temperature) between the reference ``p`` and any distribution ``q`` that gives the target token at least
probability ``a`` is 0 when ``p(y) ≥ a``, else the binary divergence with every other token scaled in
proportion (the minimiser for both directions, by the log-sum inequality):

* ``kl_rev`` (student ‖ reference): ``a·log(a/p) + (1−a)·log((1−a)/(1−p))``
* ``kl_fwd`` (reference ‖ student): ``p·log(p/a) + (1−p)·log((1−p)/(1−a))``

Aggregated over a micro-batch's barrier positions as the barrier aggregates, averaged over the micro-batches
of the first steps (as ``barrier_div_<how>`` is logged), this is the barrier's value for a student that has
just learnt every target to probability ``a`` and moved no further: the proposed τ. A barrier at that τ is
inert while the student learns the data to ``a`` and fires when it moves further from its reference.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdkit.config.schema import TrainConfig
from kdkit.loss.divergences import IGNORE_INDEX, TopK, aggregate, token_divergence
from kdkit.train.objective import BARRIER_VIEWS
from kdkit.util.errors import UsageError
from kdkit.util.progress import Ticker


def target_logprob(reference: torch.Tensor | TopK, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p_ref(target) at every position, float32 [B, T] (0 where there is no target). A dense reference is
    taken at ``temperature``; a top-K one is at its capture temperature already, and a target outside its K
    ids gets the tail's log-mass (the most it could have: a lower bound on the move it needs)."""
    tgt = targets.clamp(min=0)
    if isinstance(reference, TopK):
        hit = reference.ids == tgt[..., None]
        inside = torch.where(hit, reference.logprobs.float(), torch.full_like(reference.logprobs.float(), -math.inf))
        lp = torch.where(hit.any(-1), inside.logsumexp(-1), reference.tail_logmass().float())
    else:
        lp = torch.log_softmax(reference.float() / temperature, dim=-1).gather(-1, tgt[..., None])[..., 0]
    return torch.where(targets != IGNORE_INDEX, lp, torch.zeros_like(lp))


def least_move(logp: torch.Tensor, a: float, kind: str) -> torch.Tensor:
    """The least ``kind`` divergence from a reference giving the target log-probability ``logp`` to a
    distribution giving it probability ≥ ``a`` (0 where the reference already does), float32."""
    if not 0.0 < a < 1.0:
        raise ValueError(f"target probability must be in (0, 1), got {a}")
    lp = logp.double().clamp(max=0.0)
    la, l1a = math.log(a), math.log1p(-a)
    l1p = torch.log(-torch.expm1(lp)).clamp(min=-1e30)  # log(1 − p), finite for p → 1
    if kind == "kl_rev":
        d = a * (la - lp) + (1 - a) * (l1a - l1p)
    elif kind == "kl_fwd":
        p = lp.exp()
        d = p * (lp - la) + (1 - p) * (l1p - l1a)
    else:
        raise ValueError(f"the barrier's kind is kl_fwd or kl_rev, got {kind!r}")
    return torch.where(lp < la, d, torch.zeros_like(d)).float()


@dataclass
class TauFigures:
    """Per aggregate, the micro-batches' values at step 0 and of the least move to ``target_prob``."""

    target_prob: float
    micro_batches: int = 0
    positions: int = 0
    start: dict[str, list[float]] = field(default_factory=lambda: {h: [] for h in BARRIER_VIEWS})
    move: dict[str, list[float]] = field(default_factory=lambda: {h: [] for h in BARRIER_VIEWS})

    def mean(self, which: dict[str, list[float]], how: str) -> float:
        v = which[how]
        return sum(v) / len(v) if v else 0.0

    def as_dict(self, cfg: TrainConfig) -> dict[str, Any]:
        b = cfg.objective.barrier
        return {"kind": b.kind, "aggregate": b.aggregate, "temperature": b.temperature, "tau_now": b.tau,
                "target_prob": self.target_prob, "micro_batches": self.micro_batches, "positions": self.positions,
                "at_step_0": {h: self.mean(self.start, h) for h in BARRIER_VIEWS},
                "least_move": {h: self.mean(self.move, h) for h in BARRIER_VIEWS},
                "range": {h: [min(self.move[h], default=0.0), max(self.move[h], default=0.0)] for h in BARRIER_VIEWS},
                "proposed_tau": self.mean(self.move, b.aggregate)}


def measure(r: Any, steps: int, target_prob: float, log: Callable[[str], None] = lambda m: None) -> TauFigures:
    """The figures over the off-policy micro-batches of the first ``steps`` steps of the built run ``r``; a
    progress line per step to ``log`` (at most one every few seconds, the first and the last always)."""
    from kdkit.models.load import vocab_logits
    from kdkit.train import onpolicy
    from kdkit.train.objective import coefficients
    from kdkit.train.plan import plan_step
    from kdkit.train.step import student_forward

    b, obj = r.cfg.objective.barrier, r.cfg.objective
    fig = TauFigures(target_prob)
    n = min(steps, r.total_steps)
    ticker = Ticker("barrier tau", n, "steps", log, every=1)
    r.model.eval()
    with torch.no_grad():
        for step in range(n):
            if not onpolicy.is_on_policy(obj.on_policy, step):
                for batch in plan_step(r, step)[0]:
                    co = coefficients(batch.targets, obj, batch.roles, batch.tasks, None, None, r.acc.device)
                    mask = co.valid & co.bar_on[:, None]
                    if not mask.any():
                        continue
                    ref = r.src.reference(batch, r.model)
                    logits, _ = student_forward(r, r.model, batch, False, last_hidden_only=False)
                    student = vocab_logits(logits[:, :-1], r.real_vocab, "student").float()
                    start = token_divergence(student, ref, b.kind, temperature=b.temperature, t2_scale=False)
                    move = least_move(target_logprob(ref, batch.targets, b.temperature), target_prob, b.kind)
                    for how in BARRIER_VIEWS:
                        fig.start[how].append(float(aggregate(start, mask, how)))
                        fig.move[how].append(float(aggregate(move, mask, how)))
                    fig.micro_batches += 1
                    fig.positions += int(mask.sum())
            ticker.update(step + 1)
    return fig


def propose_tau(cfg: TrainConfig, steps: int = 8, target_prob: float = 0.5,
                log: Any = lambda m: None) -> dict[str, Any]:
    """Build the run as ``kdkit train`` would (the same checks), in a scratch directory, and measure the
    first ``steps`` steps' micro-batches; returns :meth:`TauFigures.as_dict`."""
    from kdkit.train.build import build
    from kdkit.train.loop import accelerator

    if cfg.objective.barrier is None:
        raise UsageError("objective.barrier is not set: there is no τ to propose")
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if not 0.0 < target_prob < 1.0:
        raise UsageError(f"--target-prob must be in (0, 1), got {target_prob}")
    with tempfile.TemporaryDirectory(prefix="kdkit-tau-") as scratch:  # what build writes is not kept
        run = Path(scratch) / "run"
        run.mkdir()
        r, _, _ = build(cfg, run, accelerator(cfg, run), None, log)
        fig = measure(r, steps, target_prob, log)
    if fig.micro_batches == 0:
        raise UsageError(f"no off-policy micro-batch of the first {steps} steps has a barrier position (check "
                         f"objective.roles.<role>.barrier, objective.on_policy.fraction, --steps)")
    return fig.as_dict(cfg)

