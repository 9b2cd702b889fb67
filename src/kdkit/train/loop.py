"""``kdkit train``: open → build → for each step: plan → step → after. Read :func:`train` top to bottom."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdkit.config.schema import TrainConfig
from kdkit.models import sharding
from kdkit.models.checkpoint import INPUTS_FILE, newest_checkpoint
from kdkit.teacher.served import ServedError
from kdkit.train import trackers
from kdkit.train.build import build
from kdkit.train.control import Interrupts, early_stopped, fault, probe, server_down, stop_interrupted
from kdkit.train.metrics import Sums, count_barrier_step, end_epoch, log_step
from kdkit.train.plan import peek_step, plan_step
from kdkit.train.rundir import max_weight_change, open_run, write_checkpoint, write_final
from kdkit.train.step import GradHook, optimizer_step
from kdkit.util.errors import TrainingError
from kdkit.util.io import atomic_write_json
from kdkit.util.progress import Ticker, bar_shown


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    grad_hooks: list[GradHook] | None = None,
) -> dict[str, Any]:
    """Train a student as ``cfg`` says, writing the run into ``out_dir``; returns a summary."""
    from accelerate.utils import set_seed
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if int(os.environ.get("RANK", "0")) != 0:
        log = quiet  # one voice per run under torchrun / accelerate launch: rank 0's
    run = Path(out_dir)
    done, inputs = open_run(run, cfg, resume, log)
    if done is not None:
        return done
    ckpt = newest_checkpoint(run) if resume else None
    run.mkdir(parents=True, exist_ok=True)
    acc = accelerator(cfg, run)
    set_seed(cfg.optim.seed)
    r, step, epoch_sums = build(cfg, run, acc, ckpt, log)
    if acc.is_main_process:  # after every check passed: a refused run leaves its directory as it was
        atomic_write_json(run / INPUTS_FILE, inputs)
    trackers.start(acc, cfg, run)
    stopped = bool(r.probes) and step == 0 and probe(r, 0, log) == "stop"

    shown = bar_shown(progress) and acc.is_main_process
    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not shown)
    ticker = Ticker("train", r.total_steps, "steps", log, enabled=not shown and acc.is_main_process, done=step)
    r.model.train()
    t_start = time.perf_counter()
    last_ckpt: Path | None = ckpt
    with Interrupts(log) as interrupts, bar:
        task = bar.add_task("train", total=r.total_steps, completed=step, info="")
        while step < r.total_steps and not stopped:
            t0 = time.perf_counter()
            batches, on_policy = plan_step(r, step)
            r.src.prefetch(peek_step(r, step + 1))  # a served teacher answers the next step while this one runs
            try:
                step_sums, metrics = optimizer_step(r, step, batches, on_policy, grad_hooks or [], last_ckpt)
            except ServedError as e:
                server_down(r, step, _state(r, step, epoch_sums), last_ckpt, e)
            if on_policy and r.rollout is not None:
                metrics.update(r.rollout.lag(step))
            step += 1
            epoch_sums.merge(step_sums)
            summary = log_step(r, step, step_sums, metrics, time.perf_counter() - t0)
            count_barrier_step(r, epoch_sums, summary)
            bar.update(task, completed=step, info=f"loss {summary['total_loss']:.4f}")
            ticker.update(step, _step_info(summary, step_sums))
            fault("after_step", step)
            if r.probes and (step % cfg.probes.every == 0 or step == r.total_steps):
                stopped = probe(r, step, log) == "stop"
            if step % r.steps_per_epoch == 0 or step == r.total_steps or stopped:
                end_epoch(r, step, epoch_sums)
                epoch_sums = Sums()
            state = _state(r, step, epoch_sums)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < r.total_steps and not stopped:
                last_ckpt = write_checkpoint(r, state)
                fault("after_checkpoint", step)
            if step < r.total_steps and not stopped and interrupts.agreed(acc):
                stop_interrupted(r, step, state, last_ckpt, log)

    acc.wait_for_everyone()
    final_step = early_stopped(r, step, log) if stopped else step
    drift = max_weight_change(r, run / "initial_trainable.safetensors")
    if drift <= cfg.drift_tolerance and not stopped:
        raise TrainingError(
            f"no trainable weight moved more than drift_tolerance = {cfg.drift_tolerance:g} (max |Δ| = {drift:.3g}) "
            f"after {step} steps: "
            f"the run would return its input unchanged (check optim.lr, the data's targets, the objective)")
    write_final(r, final_step)
    trackers.end(acc, cfg)
    return {"run_dir": str(run), "steps": final_step, "max_weight_change": drift,
            "seconds": time.perf_counter() - t_start, "early_stopped_at": step if stopped else None}


def _step_info(summary: dict[str, float], sums: Sums) -> str:
    """The step's figures for a progress line: loss, KL to the teacher where there is one, tokens."""
    info = f"loss {summary['total_loss']:.4f}"
    if summary.get("kl_loss"):
        info += f" · kl {summary['kl_loss']:.4f}"
    return info + f" · {sums.v['tok']:,.0f} tokens"


def _state(r: Any, step: int, epoch_sums: Sums) -> dict[str, Any]:
    """What a checkpoint at this step boundary records besides the weights, the optimizer and the RNG."""
    return {"global_step": step, "epoch_sums": epoch_sums.v, "total_steps": r.total_steps,
            "early_stop": r.early.state() if r.early is not None else None,
            "config": r.cfg.model_dump(mode="json")}  # what these weights were trained with: a resume compares


def accelerator(cfg: TrainConfig, run: Path) -> Any:
    """The run's Accelerator (its precision, its trackers), after refusing what a sharded run cannot do."""
    from accelerate.state import AcceleratorState

    mixed = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(cfg.optim.precision, "no")
    # Accelerate keeps one state per process; a second run in the same process (a ladder, the tests) may ask
    # for another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    acc = sharding.make_accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed,
                                    log_with=cfg.logging.report_to or None, project_dir=str(run))
    sharding.check_supported(cfg.model_dump(), acc)
    return acc


def quiet(message: str) -> None:
    return None
