"""The run's experiment trackers, through Accelerate's (one code path for all of them): which are asked for,
whether their packages are here, where each writes by default, and the figures and config they are given.

Every tracker gets the same numbers: each metrics.jsonl row at its step, each epochs.jsonl row as
``epoch/<name>`` at the step it ends on, and the resolved config flattened to ``section.field`` keys.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from kdkit.util.errors import KdkitError

# tracker -> (the module Accelerate imports, what to pip install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow (or mlflow-skinny)"), "trackio": ("trackio", "trackio")}


class TrackerError(KdkitError):
    """A tracker is asked for and cannot run."""


def check_installed(report_to: list[str]) -> None:
    """Refuse (at validate, before anything runs) a tracker whose package is not installed, naming it."""
    for name in report_to:
        module, pip = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"logging.report_to: {name} is asked for but {module} is not installed "
                               f"(pip install {pip})")


def start(acc: Any, cfg: Any, run: Path) -> None:
    """Open every tracker of ``logging.report_to`` on ``acc``, named after the run directory, with the
    resolved config. Defaults keep each tracker's files in the run: W&B under RUN/wandb, MLflow in a SQLite
    store RUN/mlflow.db (MLflow's own local default; its file store is retired) unless MLFLOW_TRACKING_URI says
    otherwise."""
    report_to = cfg.logging.report_to
    if not report_to:
        return
    if "mlflow" in report_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{(run / 'mlflow.db').resolve()}")
    kwargs = {"wandb": {"dir": str(run), "name": run.name}, "mlflow": {"run_name": run.name},
              "trackio": {"name": run.name}}
    acc.init_trackers(cfg.logging.project, config=flat_config(cfg.model_dump(mode="json")),
                      init_kwargs={k: v for k, v in kwargs.items() if k in report_to})


def log(acc: Any, cfg: Any, row: dict[str, Any], step: int, prefix: str = "") -> None:
    """A metrics or epochs row to every tracker: its numbers, at ``step``."""
    if cfg.logging.report_to:
        acc.log({prefix + k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)},
                step=step)


def end(acc: Any, cfg: Any) -> None:
    if cfg.logging.report_to:
        acc.end_training()


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"optim": {"lr": 1e-3}}`` → ``{"optim.lr": 1e-3}``: the scalars trackers take as hyperparameters
    (a list or null as its JSON text)."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_config(v, key + "."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = json.dumps(v, sort_keys=True)
    return out
