"""Identity is every input: fingerprints of the files and directories a result depends on.

A model directory's identity covers every file in it that changes what it computes or generates:
weights, config, tokenizer files, chat template (``chat_template.jinja`` or inside
``tokenizer_config.json``), generation config, adapters. Files that cannot change a result
(kdkit's ownership marker, a README, ``.gitattributes``) are left out, and ``transformers_version``
is dropped from the JSON configs transformers rewrites.

A run records :func:`run_inputs` in ``inputs.json`` when it starts; ``--resume`` recomputes them and
refuses to continue when one differs, naming each input and file (:func:`changed_inputs`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdkit.util.io import OWNER_FILE

_NOT_IDENTITY = frozenset({OWNER_FILE, "README.md", ".gitattributes"})
_VERSIONED_JSON = frozenset({"config.json", "generation_config.json"})


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _file_identity(path: Path) -> str:
    if path.name in _VERSIONED_JSON:
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return sha256_file(path)
        if isinstance(obj, dict):
            obj.pop("transformers_version", None)
            return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    return sha256_file(path)


def dir_files(path: str | Path, skip: str | None = None) -> dict[str, str]:
    """{relative path: sha256} of every file under ``path`` that can change a result (names starting with
    ``skip`` left out, unread)."""
    root = Path(path)
    out = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if skip is not None and rel.startswith(skip):
            continue
        if f.is_file() and f.name not in _NOT_IDENTITY and not any(p.startswith(".tmp") for p in rel.split("/")):
            out[rel] = _file_identity(f)
    return out


def digest(files: dict[str, str]) -> str:
    """One sha256 over a {name: sha256} map."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def path_identity(path: str | Path) -> dict[str, Any]:
    """``{"sha256", "files"}`` of a file or a directory (every file in it)."""
    p = Path(path)
    files = dir_files(p) if p.is_dir() else {p.name: sha256_file(p)}
    return {"sha256": digest(files), "files": files}


def _cfg_inputs(cfg: Any) -> dict[str, str | None]:
    """{config field: path} of every file or directory a training config reads."""
    t, ref = cfg.teacher, cfg.reference
    return {
        "data.train": cfg.data.train,
        "data.validation": cfg.data.validation,
        "student.path": cfg.student.path,
        "teacher.model": t.model if t is not None else None,
        "teacher.cache": t.cache if t is not None else None,
        "teacher.validation_cache": t.validation_cache if t is not None else None,
        "reference.path": ref.path if ref is not None else None,
        "probes.prompts": cfg.probes.prompts if cfg.probes is not None else None,
        "routing.pairs": cfg.routing.pairs if cfg.routing is not None else None,
        **{f"teachers.{n}.{k}": getattr(o, k) for n, o in getattr(cfg, "teachers", {}).items()
           for k in ("model", "cache")},
    }


def cache_identity(path: str | Path) -> dict[str, Any]:
    """A teacher cache by its manifest (which holds every shard's sha256, checked when a shard is read)
    and every file that is not a shard: key, a cross-tokenizer cache's ``teacher_tokenizer/``."""
    files = dir_files(path, skip="shard-")  # the shards themselves are not read here
    return {"sha256": digest(files), "files": files}


def run_inputs(cfg: Any, served_identity: Callable[[str, str | None, str], dict[str, Any]]
               ) -> dict[str, dict[str, Any]]:
    """The identity of every input of a training run, by the config field that names it; a served teacher's
    by ``served_identity(url, served_model, field)`` (:func:`kdkit.teacher.fleet.served_identity`)."""
    out = {}
    for field, p in _cfg_inputs(cfg).items():
        if p is not None and Path(p).exists():
            is_cache = field.endswith(".cache") or (field == "reference.path" and cfg.reference.kind == "cache")
            out[field] = cache_identity(p) if is_cache else path_identity(p)
    served = [("teacher", cfg.teacher), *((f"teachers.{n}", t) for n, t in getattr(cfg, "teachers", {}).items())]
    for field, t in served:
        if t is not None and t.url:
            out[f"{field}.url"] = served_identity(t.url, t.served_model, f"{field}.url")
    return out


def changed_inputs(saved: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> list[str]:
    """One line per input that differs: the field, and the files added, removed or changed in it."""
    out = []
    for field in sorted(set(saved) | set(now)):
        a, b = saved.get(field), now.get(field)
        if a is None or b is None:
            out.append(f"{field}: {'added' if a is None else 'no longer given'}")
            continue
        if a["sha256"] == b["sha256"]:
            continue
        fa, fb = a["files"], b["files"]
        parts = [f"{n} changed" for n in sorted(set(fa) & set(fb)) if fa[n] != fb[n]]
        parts += [f"{n} added" for n in sorted(set(fb) - set(fa))] + [f"{n} removed" for n in sorted(set(fa) - set(fb))]
        shown = ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")
        out.append(f"{field}: {shown or 'contents changed'}")
    return out
