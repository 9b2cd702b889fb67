"""Crash-safe file writing: nothing half-written is ever read back.

Every file is written to a temporary name in the same directory (same filesystem),
flushed and fsynced, then renamed over its final name, and the directory is
fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from kdkit.errors import OutputDirError

OWNER_FILE = ".kdkit-owner.json"


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_writers(directory: Path, prefix: str = ".tmp-") -> list[Path]:
    """Delete ``<prefix>...-<pid>`` entries (files or directories) whose writing process is gone; an entry
    of a live process is left to it. Returns what was removed."""
    removed = []
    for p in sorted(directory.glob(f"{prefix}*")) if directory.is_dir() else []:
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            for f in p.rglob("*"):  # a pack's copies are read-only
                if f.is_dir():
                    f.chmod(0o755)
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def read_jsonl_objects(path: str | Path, error: type[Exception]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file (``.gz`` accepted).

    Raises ``error`` naming the file and line for a missing file, invalid JSON, a
    line that is not a JSON object, or a file without rows.
    """
    import gzip

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        return _jsonl_rows(path, opener, error)
    except (OSError, EOFError) as e:  # e.g. a truncated or corrupt .gz
        raise error(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _jsonl_rows(path: Path, opener: Any, error: type[Exception]) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with opener(path, "rb") as fh:
        for n, raw_bytes in enumerate(fh, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{n}: not UTF-8 text (byte 0x{raw_bytes[e.start]:02x} at column {e.start + 1}); "
                            f"save the file as UTF-8") from None
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


def written_by_kdkit(path: Path, marker: str = OWNER_FILE, kind: str | None = None) -> bool:
    """True when ``path`` carries kdkit's marker file (of output ``kind`` when it is the owner file)."""
    f = path / marker
    if not f.is_file():
        return False
    if marker != OWNER_FILE or kind is None:
        return True
    try:
        return json.loads(f.read_text()).get("kind") == kind
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def check_output_dir(path: str | Path, what: str, *, marker: str = OWNER_FILE, kind: str | None = None) -> bool:
    """May kdkit (re)write the directory ``path``? False: absent or empty; True: a previous kdkit output.

    Raises :class:`OutputDirError` for a non-empty directory without kdkit's marker: kdkit never
    deletes or overwrites what it did not write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{path}: exists and is not a directory; choose another {what}")
    if not path.is_dir() or not any(path.iterdir()):
        return False
    if written_by_kdkit(path, marker, kind):
        return True
    raise OutputDirError(f"{path}: directory is not empty and was not written by kdkit (no {marker}); choose another "
                         f"{what} — kdkit never deletes or overwrites files it did not write")


def mark_output_dir(path: Path, kind: str) -> None:
    from kdkit import __version__

    atomic_write_json(path / OWNER_FILE, {"kind": kind, "kdkit_version": __version__})
