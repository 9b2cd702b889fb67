"""Checkpoints and run state on disk: what a resume reads back, written so a crash never leaves half of it.

``checkpoints/step-NNNNNNN/`` holds the trainable weights, the optimizer state, every device's RNG
state and the loop's counters, written into a temp directory with a ``COMPLETE`` marker last and
renamed; ``final/`` is written the same way. Each records the resolved config its weights were trained
with, and a resume refuses a config that differs from it in what is trained (:data:`RESUME_FREE` lists
what may change, and the resume reports it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdkit.config.schema import TrainConfig
from kdkit.models.sharding import load_full
from kdkit.util.errors import TrainingError
from kdkit.util.io import atomic_write_bytes, atomic_write_json, fsync_dir, storage


def _opt_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _opt_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def newest_checkpoint(run_dir: Path) -> Path | None:
    ck = run_dir / "checkpoints"
    done = sorted(p for p in ck.glob("step-*") if (p / "COMPLETE").is_file()) if ck.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], opt_state: dict[str, Any],
                    state: dict[str, Any], keep: int, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically: a temp dir, a COMPLETE marker last, then rename.
    ``weights`` and ``opt_state`` are full (:func:`kdkit.models.sharding.full_trainable` / ``full_optimizer``)."""
    ck = run_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    final = ck / f"step-{state['global_step']:07d}"
    tmp = ck / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with storage(final):
            tmp.mkdir()
            save_file(weights, str(tmp / "trainable.safetensors"))
            tensors, meta = _opt_to_files(opt_state)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            atomic_write_json(tmp / "optimizer.json", meta)
            save_file(rng_states(), str(tmp / "rng.safetensors"))
            atomic_write_json(tmp / "state.json", {**state, "format": CHECKPOINT_FORMAT})
            if extra:  # loop state that is a tensor (e.g. the routing directions)
                save_file(extra, str(tmp / "extra.safetensors"))
            atomic_write_bytes(tmp / "COMPLETE", b"ok\n")
            fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the earlier complete checkpoints stay; this one never existed
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(ck)
    for old in sorted(p for p in ck.glob("step-*") if (p / "COMPLETE").is_file())[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Weights, optimizer state and RNG state back from ``path`` (on every rank); returns the loop state."""
    state = json.loads((path / "state.json").read_text())
    if state.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path}: a checkpoint of format {state['format']}; this kdkit reads format "
                            f"{CHECKPOINT_FORMAT} (resume it with the kdkit that wrote it, or start a new run)")
    weights = load_file(str(path / "trainable.safetensors"))
    names = {n for n, _ in model.named_parameters()}
    for n in weights:
        if n not in names:
            raise TrainingError(f"{path}: parameter {n} is not in the model; was the config changed?")
    opt_state = _opt_from_files(load_file(str(path / "optimizer.safetensors")),
                                json.loads((path / "optimizer.json").read_text()))
    load_full(model, opt, weights, opt_state)
    set_rng_states(load_file(str(path / "rng.safetensors")))
    return state


def load_extra(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors a checkpoint was saved with as ``extra`` (None when there were none)."""
    f = path / "extra.safetensors"
    return load_file(str(f)) if f.is_file() else None


def rng_states() -> dict[str, torch.Tensor]:
    """The CPU generator and every CUDA device's: dropout on any device resumes exactly."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = st
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted((k for k in states if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise TrainingError(f"the checkpoint holds the RNG state of {len(cuda)} GPU(s), this machine has "
                                f"{torch.cuda.device_count()}; an exact resume needs the same devices")
        torch.cuda.set_rng_state_all(cuda)


# Settings that do not change what is trained: a resume may change them.
RESUME_FREE = ("logging", "checkpoint", "eval")


def config_changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "", free_too: bool = False
                   ) -> list[str]:
    """``field: old → new`` for every field that differs (except :data:`RESUME_FREE` sections, unless
    ``free_too``)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        name = f"{prefix}{k}"
        if not prefix and k in RESUME_FREE and not free_too:
            continue
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{name}.", free_too)
        elif a != b:
            out.append(f"{name}: {a!r} → {b!r}")
    return out


INPUTS_FILE = "inputs.json"
# The checkpoint layout (state.json's "format"). A checkpoint without one was written before it was
# recorded, in this same layout (kdkit 0.1, wave 2): it resumes. Another number is refused by name.
CHECKPOINT_FORMAT = 1


def trained_with(run: Path) -> tuple[dict[str, Any], Path]:
    """The config the run's newest weights were trained with, and where it was read: ``final/kdkit.json`` or
    the newest checkpoint's ``state.json`` (each records it as it is written), else the run's ``config.yaml``
    (a run that has saved no weights yet, or one made before kdkit recorded it there). ``config.yaml`` alone
    is a file a user may edit: it cannot say what the weights were trained with. It is read as a config (the
    fields it leaves out, which do not apply, at their defaults)."""
    from kdkit.config.load import load_train_config

    for path in (run / "final" / "kdkit.json",
                 *(p / "state.json" for p in [newest_checkpoint(run)] if p is not None)):
        if path.is_file() and "config" in (meta := json.loads(path.read_text())):
            return meta["config"], path
    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        raise TrainingError(f"{run}: no config.yaml — not a kdkit run directory, nothing to resume")
    return load_train_config(saved_path).model_dump(mode="json"), saved_path


def check_resume(run: Path, cfg: TrainConfig, inputs: dict[str, Any] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
    """Refuse to continue ``run`` with another config (in what is trained) or other inputs: the config against
    the one its weights were trained with (:func:`trained_with`), field by field; ``inputs``
    (:func:`kdkit.util.identity.run_inputs`) against the ``inputs.json`` the run recorded when it started. Changes
    of settings that cannot change a result (:data:`RESUME_FREE`) are reported through ``log``."""
    from kdkit.util.identity import changed_inputs

    saved, where = trained_with(run)
    now = cfg.model_dump(mode="json")
    changes = config_changes(saved, now)
    if changes:
        raise TrainingError(f"--resume with a config that differs from the one {run} was trained with ({where}) in "
                            f"what is trained: {'; '.join(changes)}. Resume with that config (a deliberate change "
                            f"needs a new run: another --out)")
    free = config_changes(saved, now, free_too=True)  # nothing else differs by now: the RESUME_FREE fields
    if free and log is not None:
        log(f"resuming with settings that do not change the result changed: {'; '.join(free)}")
    saved_inputs = run / INPUTS_FILE
    if inputs is not None and saved_inputs.is_file():
        changed = changed_inputs(json.loads(saved_inputs.read_text()), inputs)
        if changed:
            raise TrainingError(f"--resume refused: inputs differ from those {run} started with ({saved_inputs}): "
                                f"{'; '.join(changed)}. Restore them, or start a new run with another --out")


def finished(run: Path) -> dict[str, Any] | None:
    """The final/ metadata of a run that completed, else None."""
    meta = run / "final" / "kdkit.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def save_final(run: Path, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, step: int,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``final/``: the model (the adapters alone for LoRA) and tokenizer. ``state_dict``: the full weights
    gathered from a sharded model."""
    final, tmp = run / "final", run / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with storage(final):
            model.save_pretrained(str(tmp), safe_serialization=True,
                                  **({"state_dict": state_dict} if state_dict else {}))
            tokenizer.save_pretrained(str(tmp))
            atomic_write_json(tmp / "kdkit.json", {"kind": "lora" if cfg.student.lora else "full", "steps": step,
                                                   "base": cfg.student.path, "config": cfg.model_dump(mode="json")})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(run)
