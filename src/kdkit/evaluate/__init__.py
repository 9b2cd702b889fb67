"""Evaluation on executable tasks: task files (``tasks``), answers cut out of generations (``extract``),
the sandbox that runs them and fails closed (``sandbox``, with ``harness`` and ``procfilter`` inside it),
pass counts with intervals (``passrate``), and a generation's coherence (``coherence``, a module: its
function is :func:`kdkit.evaluate.coherence.coherence`)."""

from kdkit.evaluate.passrate import EvalSummary, evaluate_model, verify, wilson_interval
from kdkit.evaluate.sandbox import Limits, Program, SandboxUnavailable, run_programs
from kdkit.evaluate.tasks import Task, load_tasks

__all__ = ["Task", "load_tasks", "evaluate_model", "verify", "EvalSummary", "wilson_interval", "Limits", "Program",
           "run_programs", "SandboxUnavailable"]
