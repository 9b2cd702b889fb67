"""``kdkit train``: one loop for distillation and KL-anchored fine-tuning, along the step's arrows.

    loop.py     train(): open → build → for each step: plan → step → after (reads top to bottom)
    build.py    a frozen Run: data, student, signals, optimizer, schedule, the loss path; restore
    plan.py     which rows, micro-batches, the LR schedule, the on-policy draw
    step.py     one optimizer step: forward → objective → backward per micro-batch, hooks, clip, optimizer
    metrics.py  the only place sums become means; the validation loss
    rundir.py   every file a run writes: config.yaml, inputs.json, run.json, the jsonl logs, checkpoints, final/
    control.py  interrupts, fault injection, probe rounds and the early stop

Teacher signals come from :mod:`kdkit.teacher.signals`, the loss from :mod:`kdkit.train.objective`, checkpoint I/O from
:mod:`kdkit.models.checkpoint`. Everything a user varies is in :class:`kdkit.config.schema.TrainConfig`.
"""

from kdkit.models.load import PACK_FILE, merge
from kdkit.train.build import count_parameters
from kdkit.train.control import FAULT_ENV
from kdkit.train.loop import train
from kdkit.train.metrics import evaluate_loss
from kdkit.train.plan import lr_lambda, micro_slices, step_rows
from kdkit.train.step import GradHook
from kdkit.util.errors import TrainingError

__all__ = ["train", "merge", "evaluate_loss", "TrainingError", "PACK_FILE", "FAULT_ENV",
           "step_rows", "micro_slices", "lr_lambda", "count_parameters", "GradHook"]
