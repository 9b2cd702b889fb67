"""One base class for every error kdkit reports to a user: the CLI handles it once.

Each module raises its own subclass (``CacheError``, ``DataError``, ...); every
message names the file, line or field that is wrong and what would be valid. The
exit code says which kind of failure it was: 2 for a bad input or option (the
command was asked for something it cannot do), 1 for work that failed on the way.
"""

from __future__ import annotations


class KdkitError(Exception):
    """An error whose message is for the user: printed without a traceback.

    ``same_on_every_rank``: every process of a launched run (torchrun, accelerate launch) raises this very
    error (a refused config or option), so only rank 0 prints it."""

    exit_code = 2
    same_on_every_rank = False


class OutputDirError(KdkitError):
    """An output directory kdkit may not write into (it holds files kdkit did not write)."""


class TrainingError(KdkitError, RuntimeError):
    """Training cannot continue; the message names the step and what to do."""

    exit_code = 1


class UsageError(KdkitError, ValueError):
    """An option or argument out of range or of the wrong form; the message names it and what is valid."""


class StorageError(KdkitError):
    """A write failed because of where it went: the disk is full, the filesystem is read-only, or there is
    no permission. The message names the path and what to do; what was complete before stays usable."""
