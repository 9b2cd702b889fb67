"""Crash-safe file writing: nothing half-written is ever read back.

Every file is written to a temporary name in the same directory (same filesystem),
flushed and fsynced, then renamed over its final name, and the directory is
fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdkit.util.errors import OutputDirError, StorageError

OWNER_FILE = ".kdkit-owner.json"


def fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full: free space there (or choose another output), then rerun the same "
                                 "command: it continues from what was complete",
                   errno.EDQUOT: "the disk quota is used up: free space there (or choose another output), then rerun",
                   errno.EROFS: "the filesystem is read-only: choose a writable output directory",
                   errno.EACCES: "no permission to write there: choose another output directory",
                   errno.EPERM: "no permission to write there: choose another output directory"}


def storage_error(e: BaseException, path: str | Path) -> StorageError | None:
    """The :class:`StorageError` for an error raised while writing under ``path``: an ``OSError`` with a
    storage errno, or a safetensors error that wraps one ("(os error 28)"); None for anything else."""
    import re

    code = e.errno if isinstance(e, OSError) else None
    if code is None and type(e).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    if code not in _STORAGE_ERRNOS:
        return None
    name = getattr(e, "filename", None)
    where = path if name is None or ".tmp" in Path(str(name)).name else name  # a temp file: name what it was for
    return StorageError(f"{where}: {os.strerror(code)} — {_STORAGE_ERRNOS[code]}")


@contextmanager
def storage(path: str | Path) -> Iterator[None]:
    """Writes under ``path``: a full disk, a read-only filesystem or a refused permission becomes one
    :class:`StorageError` naming the path (the CLI prints it as one line, exit code 2)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - mapped when it is a storage error, re-raised as is otherwise
        mapped = storage_error(e, path)
        if mapped is None:
            raise
        raise mapped from None


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes, *, before_rename: Any = None) -> None:
    """Write ``data`` to ``path`` atomically. ``before_rename`` is a test hook (fault injection)."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file behind
        raise
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
    return list(iter_jsonl_objects(path, error))


def iter_jsonl_objects(path: str | Path, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`read_jsonl_objects` one line at a time: a file of any size in the memory of one row."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        yield from _jsonl_rows(path, opener, error)
    except (OSError, EOFError) as e:  # e.g. a truncated or corrupt .gz
        raise error(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


def _jsonl_rows(path: Path, opener: Any, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    any_row = False
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
            any_row = True
            yield n, obj
    if not any_row:
        raise error(f"{path}: no rows")


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
