"""The one helper for work that must not move the training's random streams."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def own_rng() -> Iterator[None]:
    """Run a block on a copy of the random state (CPU, and the current GPU when there is one): whatever it
    draws (a sampled rollout, a probe, an extra check's dropout) leaves the run's own stream where it was,
    so a resumed run draws what the uninterrupted one drew."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
