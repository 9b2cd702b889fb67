"""The only place sums become means: a step's and an epoch's sums, the metrics.jsonl and epochs.jsonl
rows, and the validation loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kdkit.config.schema import TrainConfig
from kdkit.data import rows as kdata
from kdkit.loss.divergences import TopK, aggregate, token_ce, token_divergence
from kdkit.models.load import vocab_logits
from kdkit.teacher.signals import Signal
from kdkit.train import trackers
from kdkit.train.objective import SUM_KEYS, ObjectiveOutput, means
from kdkit.train.rundir import append_jsonl

if TYPE_CHECKING:
    from kdkit.train.run import Run


@dataclass
class Sums:
    """The objective's metric sums (:data:`kdkit.train.objective.SUM_KEYS`) over micro-batches, ranks, steps and
    epochs. Within a step they are device tensors (each micro-batch's sums are added where they were
    computed); :meth:`reduce` reads them once, summed over the ranks, into floats; :meth:`summary` turns
    them into means (:func:`kdkit.train.objective.means`, the one place that divides)."""

    keys = (*SUM_KEYS, "steps")  # always there; per-teacher sums ("kl@name", ...) join when a term makes them
    v: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(Sums.keys, 0.0))

    def reduce(self, acc: Any) -> None:
        """Every sum as a float, over all ranks: one host read for the whole step. (Every micro-batch of
        every rank makes the same keys: each configured teacher's term runs, with or without rows.)"""
        keys = sorted(self.v)
        packed = torch.stack([torch.as_tensor(self.v[k], dtype=torch.float64, device=acc.device).reshape(())
                              for k in keys])
        self.v = dict(zip(keys, acc.reduce(packed, "sum").tolist(), strict=True))

    def add_output(self, out: ObjectiveOutput) -> None:
        for k, v in out.sums.items():
            self.v[k] = self.v.get(k, 0.0) + v

    def merge(self, other: Sums) -> None:
        for k, v in other.v.items():
            self.v[k] = self.v.get(k, 0.0) + v

    def summary(self) -> dict[str, float]:
        """The means of what was summed: the loss and the barrier per optimizer step."""
        return means(self.v, max(self.v["steps"], 1.0))


VALIDATION_ROWS = "validation_rows.json"  # the latest epoch's validation sums per row


def log_step(r: Run, step: int, sums: Sums, metrics: dict[str, float], dt: float) -> dict[str, float]:
    """A metrics.jsonl row (every ``logging.every`` steps and at the end); the step's loss summary."""
    summary = sums.summary()
    if r.acc.is_main_process and (step % r.cfg.logging.every == 0 or step == r.total_steps):
        row = {"step": step, "epoch": (step - 1) // r.steps_per_epoch, "tokens": sums.v["tok"], "step_time_s": dt,
               "tokens_per_s": sums.v["tok"] / max(dt, 1e-9), **summary, **metrics}
        append_jsonl(r.metrics_path, row)
        trackers.log(r.acc, r.cfg, row, step)
    return summary


def count_barrier_step(r: Run, epoch_sums: Sums, summary: dict[str, float]) -> None:
    """Every step, logged or not: one more step in ``epoch_sums`` on which the barrier's divergence under its
    aggregate (the micro-batches' mean, as ``barrier_div_<how>`` is logged) was above τ — its hinge active;
    below τ the barrier does nothing — and one more step it was measured on."""
    barrier = r.cfg.objective.barrier
    div = summary.get(f"barrier_div_{barrier.aggregate}") if barrier is not None else None
    if div is not None:
        for key, add in (("barrier_active_steps", float(div > barrier.tau)), ("barrier_steps", 1.0)):
            epoch_sums.v[key] = epoch_sums.v.get(key, 0.0) + add


def end_epoch(r: Run, step: int, epoch_sums: Sums) -> None:
    """The epoch's row in epochs.jsonl, with the validation loss (and KL to a live teacher)."""
    live = r.src.teacher if r.src.teacher is not None and r.src.teacher.scores_any_tokens else None
    ev = evaluate_loss(r.acc.unwrap_model(r.model), r.val_rows, r.cfg, r.pad_id, r.real_vocab, r.acc.device,
                       live or r.src.validation) if r.val_rows else {}
    if r.acc.is_main_process:
        summary = epoch_sums.summary()
        per_row = ev.pop("per_row", None)
        counted = {k: int(epoch_sums.v[k]) for k in ("barrier_active_steps", "barrier_steps") if k in epoch_sums.v}
        row = {"epoch": (step - 1) // r.steps_per_epoch, "step": step, "train_loss": summary["total_loss"],
               **summary, **counted, **ev}
        append_jsonl(r.epochs_path, row)
        trackers.log(r.acc, r.cfg, row, step, prefix="epoch/")
        if per_row is not None:  # the latest epoch's, row by row: `kdkit report`'s paired intervals
            from kdkit.util.io import atomic_write_json

            atomic_write_json(r.dir / VALIDATION_ROWS, {"epoch": row["epoch"], "step": step, **per_row})


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, rows: list[kdata.TokenizedRow], cfg: TrainConfig, pad_id: int,
                  real_vocab: int, device: torch.device, teacher: Signal | None = None) -> dict[str, float]:
    """Validation CE per target token; with a teacher that scores the validation rows (a live model, or the
    cache of ``teacher.validation_cache``), KL(teacher ‖ student) per target token and the share of target
    positions where the student's top-1 token is the teacher's."""
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = 0.0
    agree: float | None = 0.0
    n = 0
    per_row: dict[str, list] = {"line": [], "tokens": [], "ce_sum": [], "kl_sum": []}
    for i in range(0, len(rows), cfg.optim.micro_batch):
        chunk = rows[i:i + cfg.optim.micro_batch]
        batch = kdata.collate(chunk, pad_id, row_index=range(i, i + len(chunk))).to(device)  # a cache: by row
        logits = vocab_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1],
                              real_vocab, "student").float()
        valid = batch.targets != kdata.IGNORE_INDEX
        ce_rows = token_ce(logits, batch.targets).double().sum(1)
        ce_sum += float(ce_rows.sum())
        n += int(valid.sum())
        per_row["line"] += [r.line for r in chunk]
        per_row["tokens"] += valid.sum(1).tolist()
        per_row["ce_sum"] += ce_rows.tolist()
        if teacher is not None:
            signal = teacher(batch, model)
            div = token_divergence(logits, signal, "kl_fwd", temperature=cfg.objective.kd.temperature, t2_scale=False)
            kl_sum += float(aggregate(div, valid, "sum"))
            per_row["kl_sum"] += torch.where(valid, div, torch.zeros_like(div)).double().sum(1).tolist()
            top = signal.ids[..., 0] if isinstance(signal, TopK) else signal.argmax(-1) if isinstance(
                signal, torch.Tensor) else None  # another tokenizer's teacher: no token-for-token top-1
            agree = None if top is None or agree is None else agree + float(((logits.argmax(-1) == top) & valid).sum())
    model.train(was_training)
    out: dict[str, Any] = {"val_loss": ce_sum / max(n, 1), "per_row": per_row if teacher is not None else
                           {k: v for k, v in per_row.items() if k != "kl_sum"}}
    if teacher is not None:
        out["val_kl"] = kl_sum / max(n, 1)
        if agree is not None:
            out["val_top1"] = agree / max(n, 1)
    return out
