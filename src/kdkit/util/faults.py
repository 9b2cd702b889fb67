"""Fault injection for the crash tests: one helper for train, precompute and the registry.

A test sets an environment variable (``KDKIT_FAULT_TRAIN``, ``KDKIT_FAULT_PRECOMPUTE``,
``KDKIT_FAULT_REGISTRY``) to a point name; the process kills itself with SIGKILL (or sends itself a
real SIGINT, for the Ctrl-C tests) when it reaches that point. Unset, nothing happens.
"""

from __future__ import annotations

import os
import signal


def kill_if(env: str, point: str, sig: int = signal.SIGKILL) -> None:
    """Send this process ``sig`` when ``$env`` names ``point``."""
    if os.environ.get(env) == point:
        os.kill(os.getpid(), sig)
