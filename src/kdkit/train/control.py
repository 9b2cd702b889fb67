"""Control of a run from outside the step: interrupts (Ctrl-C), fault injection for the crash tests,
probe rounds and the early stop on a coherence floor."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from kdkit.models import sharding
from kdkit.teacher.signals import unwrap
from kdkit.train.probes import probe_round
from kdkit.train.rundir import append_jsonl, write_checkpoint
from kdkit.util.errors import TrainingError
from kdkit.util.faults import kill_if
from kdkit.util.io import atomic_write_json
from kdkit.util.rng import own_rng

if TYPE_CHECKING:
    from kdkit.train.run import Run


FAULT_ENV = "KDKIT_FAULT_TRAIN"


def fault(point: str, step: int) -> None:
    """Fault injection for the crash tests: KDKIT_FAULT_TRAIN=<point>:<step> kills -9 there;
    ``sigint:<step>`` sends this process a real SIGINT after that step, ``sigint_mid:<step>`` in the middle
    of it (after the first micro-batch's backward), as a Ctrl-C would."""
    kill_if(FAULT_ENV, f"{point}:{step}")
    if point in ("after_step", "mid_step"):
        kill_if(FAULT_ENV, f"{'sigint' if point == 'after_step' else 'sigint_mid'}:{step}", signal.SIGINT)


class Interrupts:
    """Ctrl-C during training: the current step finishes, a checkpoint is saved at that step boundary (so
    weights, optimizer, RNG state and logs agree), then KeyboardInterrupt. A second Ctrl-C stops at once.

    The handler is installed explicitly, so it works where SIGINT starts out ignored (background jobs)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.requested = False
        self.log = log
        self._old: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to stop without one)")

    def __enter__(self) -> Interrupts:
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def agreed(self, acc: Any) -> bool:
        """Whether any rank was interrupted (every rank must stop at the same step)."""
        if acc.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=acc.device)
        return bool(acc.reduce(flag, "sum").item() > 0)


LAST_GOOD = "last_good_trainable.safetensors"


def probe(r: Run, step: int, log: Callable[[str], None]) -> str:
    """A probe round after ``step``: its rows written, the coherence floor applied ('none' without one)."""
    live = [s for s in (r.src.reference, r.src.teacher) if s is not None and s.scores_any_tokens]
    with own_rng():  # greedy, but never let a probe move the training RNG
        records, row = probe_round(unwrap(r.model), r.tokenizer, r.probes, r.cfg.probes, step,
                                   live[0] if live else None, r.real_vocab)
    if live:
        row["probe_kl_to"] = live[0].what
    verdict = r.early.update(step, row["probe_coherence"]) if r.early is not None else "none"
    if r.early is not None:
        row["coherence_floor"] = verdict
    if r.acc.is_main_process:
        for rec in records:
            append_jsonl(r.probes_path, rec)
        append_jsonl(r.metrics_path, row)
        if verdict == "good":  # the weights final/ falls back to if the run later drops below the floor
            save_file(sharding.full_trainable(r.acc.unwrap_model(r.model)), str(r.dir / f".tmp-{LAST_GOOD}"))
            os.replace(r.dir / f".tmp-{LAST_GOOD}", r.dir / LAST_GOOD)
    if verdict == "stop":
        log(f"early stop after step {step}: probe coherence {row['probe_coherence']:.3f} below the floor "
            f"{r.cfg.early_stop.coherence_floor} for {r.cfg.early_stop.patience} round(s)")
    return verdict


def early_stopped(r: Run, step: int, log: Callable[[str], None]) -> int:
    """Put the weights of the last probe round at or above the floor back (the initial ones if none was),
    record the stop in run.json, and return that round's step: final/ holds those weights."""
    good = r.early.last_good_step
    source = r.dir / (LAST_GOOD if good is not None else "initial_trainable.safetensors")
    weights = load_file(str(source))
    params = dict(r.acc.unwrap_model(r.model).named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    final_step = good if good is not None else 0
    if r.acc.is_main_process:
        meta = json.loads((r.dir / "run.json").read_text())
        meta["early_stop"] = {"stopped_after_step": step, "final_step": final_step,
                              "coherence_floor": r.cfg.early_stop.coherence_floor,
                              "patience": r.cfg.early_stop.patience, "probe_coherence": r.early.history}
        atomic_write_json(r.dir / "run.json", meta)
    log(f"final/ holds the weights of step {final_step}, the last probe round at or above the floor")
    return final_step


def server_down(r: Run, step: int, state: dict[str, Any], last_ckpt: Path | None, error: Exception) -> None:
    """The served teacher stopped answering before step ``step + 1`` computed anything: a checkpoint at this
    step boundary (unless one was just written), then a :class:`TrainingError` that says how to go on."""
    r.opt.zero_grad(set_to_none=True)
    if last_ckpt is None or last_ckpt.name != f"step-{step:07d}":
        last_ckpt = write_checkpoint(r, state)
    raise TrainingError(f"{error}. Stopped before step {step + 1}: saved {last_ckpt}; start the server again "
                        f"and continue with --resume (the run goes on bit for bit)") from None


def stop_interrupted(r: Run, step: int, state: dict[str, Any], last_ckpt: Path | None,
                     log: Callable[[str], None]) -> None:
    """Ctrl-C: a checkpoint at this step boundary (unless one was just written), then stop."""
    if last_ckpt is None or last_ckpt.name != f"step-{step:07d}":
        last_ckpt = write_checkpoint(r, state)
    log(f"interrupted after step {step}: saved {last_ckpt}; continue with --resume")
    raise KeyboardInterrupt
