"""The Run record: everything the training loop reads, built once (:mod:`kdkit.train.build`) and frozen."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdkit.config.schema import TrainConfig
from kdkit.data import rows as kdata
from kdkit.teacher.signals import Sources
from kdkit.train.hidden import HiddenDistill
from kdkit.train.objective import Objective
from kdkit.train.probes import EarlyStop, Probe
from kdkit.train.rollout import RolloutServer
from kdkit.train.routing import Router


@dataclass(frozen=True)
class Run:
    """Everything the loop reads, built once by :func:`kdkit.train.build.build` and not changed after (the optimizer, the
    schedule, the early stop and the router keep their own state)."""

    cfg: TrainConfig
    acc: Any
    dir: Path
    tokenizer: Any
    rows: list[kdata.TokenizedRow]
    val_rows: list[kdata.TokenizedRow]
    pad_id: int
    real_vocab: int
    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: Any
    src: Sources
    objective: Objective  # the run's terms, chosen once
    on_policy_objective: Objective | None  # an on-policy step's (no CE on generated tokens), with objective.on_policy
    world: int
    rank: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    probes: list[Probe] = field(default_factory=list)
    early: EarlyStop | None = None
    router: Router | None = None
    hidden: HiddenDistill | None = None
    rollout: RolloutServer | None = None  # the student's vLLM server that writes on-policy completions

    @property
    def chunked(self) -> bool:
        """The memory-lean chunked loss: the student's logits never held whole."""
        return self.objective.chunked

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def epochs_path(self) -> Path:
        return self.dir / "epochs.jsonl"

    @property
    def probes_path(self) -> Path:
        return self.dir / "probes.jsonl"

    @property
    def grad_hooks(self) -> list[Any]:
        """The run's own gradient hooks (routing), before any the caller adds."""
        return [self.router] if self.router is not None else []
