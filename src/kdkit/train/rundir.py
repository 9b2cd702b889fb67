"""Every file a run writes, and how a run directory is opened, resumed and finished: config.yaml,
inputs.json, run.json, metrics.jsonl / epochs.jsonl / probes.jsonl, checkpoints/ and final/."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from kdkit import __version__
from kdkit.config.load import dump_config
from kdkit.config.schema import TrainConfig
from kdkit.models import sharding
from kdkit.models.checkpoint import INPUTS_FILE, check_resume, finished, save_checkpoint, save_final
from kdkit.models.load import sha256_file
from kdkit.teacher.fleet import served_identity
from kdkit.train.objective import resolved_chunk
from kdkit.util.errors import TrainingError
from kdkit.util.identity import run_inputs
from kdkit.util.io import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from kdkit.train.run import Run


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of one of a run's jsonl logs (metrics, epochs, probes); none when it is not there. The one
    reader of them: training (on resume), ladder and report."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def truncate_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    if path.is_file():
        rows = read_log(path)
        atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows if keep(r)).encode())


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def open_run(run: Path, cfg: TrainConfig, resume: bool, log: Callable[[str], None]
              ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Refuse a run directory that is not ours to write, or a resume whose config or inputs changed. Returns
    the summary of a run that already completed (else None) and the inputs' identity."""
    if not resume and run.exists() and any(run.iterdir()):
        raise TrainingError(f"{run}: run directory is not empty; pass --resume to continue it or choose another --out")
    inputs = run_inputs(cfg, served_identity)
    if resume and run.is_dir() and any(run.iterdir()):
        if not (run / INPUTS_FILE).is_file():
            log(f"note: {run} has no {INPUTS_FILE} (made before kdkit recorded its inputs): inputs not checked")
        check_resume(run, cfg, inputs, log)
        done = finished(run)
        if done is not None:
            log(f"{run}: the run is complete ({done['steps']} steps, final/ written); nothing to resume")
            return {"run_dir": str(run), "steps": done["steps"], "max_weight_change": None, "seconds": 0.0,
                    "already_complete": True}, inputs
    return None, inputs


def write_run_meta(r: Run, why_not: str | None) -> None:
    cfg = r.cfg
    manifest_sha = (sha256_file(Path(cfg.teacher.cache) / "manifest.json")
                    if cfg.teacher is not None and cfg.teacher.cache else None)
    atomic_write_bytes(r.dir / "config.yaml", dump_config(cfg).encode())
    atomic_write_json(r.dir / "run.json", {
        "kdkit_version": __version__, "git_revision": git_revision(), "torch": torch.__version__,
        "distributed": str(r.acc.distributed_type.value).lower(),
        "teacher_cache_manifest_sha256": manifest_sha, "world_size": r.world, "rows": len(r.rows),
        "loss_path": f"dense ({why_not})" if why_not else
        f"chunked ({resolved_chunk(cfg.objective.chunk_size, r.real_vocab)} positions)",
        "precision": cfg.optim.precision, "gradient_checkpointing": cfg.optim.gradient_checkpointing,
        "threads": torch.get_num_threads(),
        "packing": {"pack_length": cfg.data.pack_length or cfg.data.max_length} if cfg.data.packing else None,
        "steps_per_epoch": r.steps_per_epoch, "total_steps": r.total_steps})


def write_final(r: Run, step: int) -> None:
    """final/: every rank gathers (a collective when the model is sharded); rank 0 writes."""
    model = r.acc.unwrap_model(r.model)
    full = sharding.full_model(model, trainable_only=r.cfg.student.lora is not None)
    if r.acc.is_main_process:
        save_final(r.dir, model, r.tokenizer, r.cfg, step, full)
        if r.hidden is not None and len(r.hidden.proj):  # the run keeps its projections; a merged pack does not
            save_file({k: v.detach().cpu().contiguous() for k, v in r.hidden.state_dict().items()},
                      str(r.dir / "final" / "hidden_projection.safetensors"))


def write_checkpoint(r: Run, state: dict[str, Any]) -> Path:
    """Every rank gathers (a collective when the model is sharded); rank 0 writes."""
    r.acc.wait_for_everyone()
    model = r.acc.unwrap_model(r.model)
    weights, opt_state = sharding.full_trainable(model), sharding.full_optimizer(model, r.opt)
    path = r.dir / "checkpoints" / f"step-{state['global_step']:07d}"
    if r.acc.is_main_process:
        path = save_checkpoint(r.dir, weights, opt_state, state, r.cfg.checkpoint.keep, loop_state(r))
    r.acc.wait_for_everyone()
    return path


def loop_state(r: Run) -> dict[str, torch.Tensor] | None:
    """Loop state beside the model's weights: routing directions, hidden-state projections."""
    out = r.router.state() if r.router is not None else {}
    if r.hidden is not None:
        out.update({f"hidden.{k}": v.detach().cpu().contiguous() for k, v in r.hidden.state_dict().items()})
    return out or None


def max_weight_change(r: Run, initial_path: Path) -> float:
    """The largest change of any trainable weight since the start (the same on every rank)."""
    cur = sharding.full_trainable(r.acc.unwrap_model(r.model))
    init = load_file(str(initial_path)) if cur else {}
    local = max((float((cur[n].float() - init[n].float()).abs().max()) for n in init), default=0.0)
    return float(r.acc.reduce(torch.tensor(local, dtype=torch.float64, device=r.acc.device), "max"))
