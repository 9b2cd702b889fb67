"""Crash-safe file writing: nothing half-written is ever read back.

Every file is written to a temporary name in the same directory (same filesystem),
flushed and fsynced, then renamed over its final name, and the directory is
fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes, *, before_rename: Any = None) -> None:
    """Write ``data`` to ``path`` atomically. ``before_rename`` is a test hook (fault injection)."""
    path = Path(path)
    tmp = tmp_name(path)
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def canonical_json(obj: Any) -> bytes:
    """Stable JSON bytes: sorted keys, fixed separators, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, canonical_json(obj))


def remove_stale_tmp(directory: Path) -> int:
    """Delete temp files a killed writer left behind; returns how many."""
    n = 0
    for p in directory.glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def read_jsonl_objects(path: str | Path, error: type[Exception]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file (``.gz`` accepted).

    Raises ``error`` naming the file and line for a missing file, invalid JSON, a
    line that is not a JSON object, or a file without rows.
    """
    import gzip

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{n}: field '<row>': expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    if not rows:
        raise error(f"{path}: no rows")
    return rows
