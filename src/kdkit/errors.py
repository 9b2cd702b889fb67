"""One base class for every error kdkit reports to a user: the CLI handles it once.

Each module raises its own subclass (``CacheError``, ``DataError``, ...); every
message names the file, line or field that is wrong and what would be valid.
"""

from __future__ import annotations


class KdkitError(Exception):
    """An error whose message is for the user: printed without a traceback."""


class OutputDirError(KdkitError):
    """An output directory kdkit may not write into (it holds files kdkit did not write)."""
