"""Which rows an optimizer step trains on: the epoch-seeded order, this rank's micro-batches, the
learning-rate schedule, and on an on-policy step the student's own completions."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kdkit.data import rows as kdata
from kdkit.teacher.signals import unwrap
from kdkit.train import onpolicy

if TYPE_CHECKING:
    from kdkit.train.run import Run


def step_rows(n_rows: int, step: int, steps_per_epoch: int, global_batch: int, seed: int) -> list[int]:
    """Row indices of one optimizer step (all ranks, all micro-batches): epoch-seeded permutation."""
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return perm[k * global_batch:(k + 1) * global_batch]


def micro_slices(rows: list[int], micro: int, accum: int, world: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of a step; may be empty at the end of an epoch."""
    return [rows[(m * world + rank) * micro:(m * world + rank + 1) * micro] for m in range(accum)]


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        frac = min(max(frac, 0.0), 1.0)
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def empty_batch(rows: list[kdata.TokenizedRow], pad_id: int) -> kdata.Batch:
    """A micro-batch with no target: loss 0, gradient 0, but it still joins the collective ops."""
    b = kdata.collate([rows[0]], pad_id, [0])
    b.targets.fill_(kdata.IGNORE_INDEX)
    return b


def peek_step(r: Run, step: int) -> list[kdata.Batch]:
    """The micro-batches of a step to come, when it is off-policy (its rows are then known in advance: a
    served teacher is asked for them while this step computes); else none."""
    if step >= r.total_steps or onpolicy.is_on_policy(r.cfg.objective.on_policy, step):
        return []
    return plan_step(r, step)[0]


def plan_step(r: Run, step: int) -> tuple[list[kdata.Batch], bool]:
    """This rank's micro-batches of optimizer step ``step`` (0-based), and whether the step is on-policy:
    then every row keeps its prompt and the student writes the completion (the only target)."""
    o = r.cfg.optim
    ids = step_rows(len(r.rows), step, r.steps_per_epoch, r.global_batch, r.cfg.data.shuffle_seed)
    micro = micro_slices(ids, o.micro_batch, o.grad_accum, r.world, r.rank)
    op = r.cfg.objective.on_policy
    on = onpolicy.is_on_policy(op, step)
    if on and r.rollout is not None:  # the student's server gets the current weights when a sync is due
        r.rollout.sync(unwrap(r.model), step)
    batches = []
    for j, m in enumerate(micro):
        if not m:
            batches.append(empty_batch(r.rows, r.pad_id))
            continue
        rows = [r.rows[i] for i in m]
        if on:
            rows = onpolicy.rollouts(unwrap(r.model), r.tokenizer, rows, op,
                                     onpolicy.sample_seed(op, step, r.rank, j), r.rollout)
        batches.append(kdata.collate(rows, r.pad_id, m).to(r.acc.device))
    return batches, on
