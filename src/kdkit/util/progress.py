"""Progress of long work: a rich bar on a terminal; elsewhere (a log file, a pipe, ``--no-progress``) a line
every twentieth of the work and at its end, with the rate, the time so far and an estimate of what is
left, so that an unattended run says what it is doing."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

LINES = 20  # lines per piece of work when no bar is shown
MIN_INTERVAL_S = 5.0  # ... and not more often than this (the first and the last line always)


def bar_shown(progress: bool) -> bool:
    """A bar only where a person watches: asked for, and standard output a terminal."""
    return progress and sys.stdout.isatty()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Ticker:
    """``what: 12/40 steps (30%) · <info> · 3.2 steps/s · elapsed 0:00:04 · left ~0:00:09`` every ``every``
    units (default: a twentieth of ``total``), at most one per ``min_interval_s`` but always the first and the
    last, to ``log``; silent where a bar is shown."""

    def __init__(self, what: str, total: int, unit: str, log: Callable[[str], None], *, enabled: bool = True,
                 done: int = 0, every: int | None = None, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self.what, self.total, self.unit, self.log, self.enabled = what, total, unit, log, enabled
        self.every, self.min_interval_s = every or max(1, total // LINES), min_interval_s
        self.start_done, self.next = done, (done // self.every + 1) * self.every
        self.t0, self.last = time.perf_counter(), None

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled or (done < self.next and done < self.total):
            return
        self.next = (done // self.every + 1) * self.every
        now = time.perf_counter()
        if done < self.total and self.last is not None and now - self.last < self.min_interval_s:
            return  # quick work: the first line, then no more than one a few seconds, and the last
        self.last = now
        elapsed = now - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = f"left ~{_clock((self.total - done) / rate)}" if rate > 0 and done < self.total else "done"
        parts = [f"{self.what}: {done}/{self.total} {self.unit} ({100 * done / max(self.total, 1):.0f}%)",
                 *([info] if info else []), f"{rate:,.2f} {self.unit}/s", f"elapsed {_clock(elapsed)}", left]
        self.log(" · ".join(parts))
