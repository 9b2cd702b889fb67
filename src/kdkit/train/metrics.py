"""The only place sums become means: a step's and an epoch's sums, the metrics.jsonl and epochs.jsonl
rows, and the validation loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kdkit import data as kdata
from kdkit.config import TrainConfig
from kdkit.losses import aggregate, token_divergence
from kdkit.models import vocab_logits
from kdkit.objective import ObjectiveOutput
from kdkit.teacher import Signal
from kdkit.train.rundir import append_jsonl

if TYPE_CHECKING:
    from kdkit.train.build import Run


@dataclass
class Sums:
    """Token-weighted running sums, reduced across micro-batches and ranks. Within a step they are device
    tensors (the metrics of each micro-batch are added where they were computed); :meth:`reduce` reads
    them once, summed over the ranks, into floats."""

    keys = ("total", "ce", "tok", "kl", "kd_tok", "barrier", "tail", "tail_tok", "agree", "agree_tok", "hidden",
            "hidden_tok", "steps")
    v: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(Sums.keys, 0.0))

    def reduce(self, acc: Any) -> None:
        """Every sum as a float, over all ranks: one host read for the whole step."""
        packed = torch.stack([torch.as_tensor(self.v[k], dtype=torch.float64, device=acc.device).reshape(())
                              for k in self.keys])
        self.v = dict(zip(self.keys, acc.reduce(packed, "sum").tolist(), strict=True))

    def add_output(self, out: ObjectiveOutput) -> None:
        m = out.metrics
        self.v["total"] += m["total_loss"]
        self.v["ce"] += m["ce_loss"] * m["tokens"]
        self.v["tok"] += m["tokens"]
        kd_tok = m.get("kd_tokens", 0.0)
        self.v["kl"] += m.get("kl_loss", 0.0) * kd_tok
        self.v["kd_tok"] += kd_tok
        self.v["barrier"] += m.get("barrier", 0.0)
        # a top-K teacher has a tail mass, a teacher with the same vocabulary a top-1 agreement
        self.v["tail"] += m.get("tail_mass", 0.0) * kd_tok
        self.v["tail_tok"] += kd_tok if "tail_mass" in m else 0.0
        self.v["agree"] += m.get("top1_agree", 0.0) * kd_tok
        self.v["agree_tok"] += kd_tok if "top1_agree" in m else 0.0
        self.v["hidden"] += m.get("hidden_loss", 0.0) * m.get("hidden_tokens", 0.0)
        self.v["hidden_tok"] += m.get("hidden_tokens", 0.0)

    def merge(self, other: Sums) -> None:
        for k in self.keys:
            self.v[k] += other.v[k]

    def summary(self, per_step_total: bool) -> dict[str, float]:
        steps = max(self.v["steps"], 1.0) if per_step_total else 1.0
        out = {"total_loss": self.v["total"] / steps, "ce_loss": self.v["ce"] / max(self.v["tok"], 1.0),
               "barrier": self.v["barrier"] / steps}
        if self.v["kd_tok"]:
            out["kl_loss"] = self.v["kl"] / self.v["kd_tok"]
        if self.v["tail_tok"]:
            out["tail_mass"] = self.v["tail"] / self.v["tail_tok"]
        if self.v["agree_tok"]:
            out["top1_agree"] = self.v["agree"] / self.v["agree_tok"]
        if self.v["hidden_tok"]:
            out["hidden_loss"] = self.v["hidden"] / self.v["hidden_tok"]
        return out


def log_step(r: Run, step: int, sums: Sums, metrics: dict[str, float], dt: float) -> dict[str, float]:
    """A metrics.jsonl row (every ``logging.every`` steps and at the end); the step's loss summary."""
    summary = sums.summary(per_step_total=True)
    if r.acc.is_main_process and (step % r.cfg.logging.every == 0 or step == r.total_steps):
        row = {"step": step, "epoch": (step - 1) // r.steps_per_epoch, "tokens": sums.v["tok"], "step_time_s": dt,
               "tokens_per_s": sums.v["tok"] / max(dt, 1e-9), **summary, **metrics}
        append_jsonl(r.metrics_path, row)
        if r.cfg.logging.tensorboard:
            r.acc.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)
    return summary


def end_epoch(r: Run, step: int, epoch_sums: Sums) -> None:
    """The epoch's row in epochs.jsonl, with the validation loss (and KL to a live teacher)."""
    live = r.src.teacher if r.src.teacher is not None and r.src.teacher.scores_any_tokens else None
    ev = evaluate_loss(r.acc.unwrap_model(r.model), r.val_rows, r.cfg, r.pad_id, r.real_vocab, r.acc.device,
                       live) if r.val_rows else {}
    if r.acc.is_main_process:
        summary = epoch_sums.summary(True)
        append_jsonl(r.epochs_path, {"epoch": (step - 1) // r.steps_per_epoch, "step": step,
                                      "train_loss": summary["total_loss"], **summary, **ev})


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, rows: list[kdata.TokenizedRow], cfg: TrainConfig, pad_id: int,
                  real_vocab: int, device: torch.device, teacher: Signal | None = None) -> dict[str, float]:
    """Validation CE per target token, and KL(teacher ‖ student) per target token when the teacher can score
    any rows (a live model)."""
    was_training = model.training
    model.eval()
    ce_sum = kl_sum = 0.0
    n = 0
    for i in range(0, len(rows), cfg.optim.micro_batch):
        batch = kdata.collate(rows[i:i + cfg.optim.micro_batch], pad_id).to(device)
        logits = vocab_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1],
                              real_vocab, "student").float()
        valid = batch.targets != kdata.IGNORE_INDEX
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none")
        ce_sum += float(ce[valid].sum())
        n += int(valid.sum())
        if teacher is not None:
            div = token_divergence(logits, teacher(batch, model), "kl_fwd", temperature=cfg.objective.kd.temperature,
                                   t2_scale=False)
            kl_sum += float(aggregate(div, valid, "sum"))
    model.train(was_training)
    out = {"val_loss": ce_sum / max(n, 1)}
    if teacher is not None:
        out["val_kl"] = kl_sum / max(n, 1)
    return out
