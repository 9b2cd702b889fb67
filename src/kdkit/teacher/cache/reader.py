"""Reading a teacher cache: verification, compatibility checks, and TopK batches for training."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.numpy import load as load_bytes

from kdkit.loss.divergences import TopK
from kdkit.teacher.cache.format import (
    KEY_FIELDS,
    MANIFEST_FILE,
    CacheError,
    CacheMismatch,
    decode_ids,
    decode_logprobs,
    shard_name,
)
from kdkit.util.identity import dir_files, sha256_file


class _Shard(BaseModel):
    model_config = ConfigDict(extra="allow")
    file: str
    rows: tuple[int, int]
    sha256: str
    bytes: int
    tokens: int


class _Stats(BaseModel):
    model_config = ConfigDict(extra="allow")
    tail_mass_mean: float
    tail_mass_p50: float
    tail_mass_p95: float
    teacher_entropy_mean: float | None  # None: a served teacher, which returns its top-K alone


class _Manifest(BaseModel):
    """The fields a reader relies on; anything missing or of the wrong type is refused by name."""

    model_config = ConfigDict(extra="allow")
    format_version: int
    key: str
    components: dict[str, Any]
    teacher: dict[str, Any]
    vocab_size: int
    encoding: dict[str, str]
    rows: int
    tokens: int
    bytes: int
    bytes_per_token: float
    shards: list[_Shard]
    stats: _Stats


def _check_manifest(man: Any, mf: Path) -> dict[str, Any]:
    if not isinstance(man, dict):
        raise CacheError(f"{mf}: expected a JSON object, got {type(man).__name__}{_RERUN}")
    try:
        _Manifest.model_validate(man)
    except ValidationError as e:
        err = e.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        raise CacheError(f"{mf}: field '{where}': {err['msg'].lower()}{_RERUN}") from None
    missing = [f for f in KEY_FIELDS if f not in man["components"]]
    if missing:
        raise CacheError(f"{mf}: field 'components.{missing[0]}': missing{_RERUN}")
    expected = -(-man["rows"] // max(int(man["components"]["shard_rows"]), 1))
    if len(man["shards"]) != expected:
        raise CacheError(f"{mf}: field 'shards': {len(man['shards'])} listed, {man['rows']} rows need {expected}{_RERUN}")
    return man


_RERUN = " (the manifest is damaged: rerun the same `kdkit precompute` to verify and repair the cache)"


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a complete cache, checked field by field."""
    path = Path(path)
    mf = path / MANIFEST_FILE
    if not path.is_dir():
        raise CacheError(f"{path}: no such cache directory")
    if not mf.is_file():
        raise CacheError(f"{path}: no {MANIFEST_FILE} — the cache is incomplete (rerun `kdkit precompute` "
                         f"with the same arguments to resume it)")
    try:
        man = json.loads(mf.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CacheError(f"{mf}: not UTF-8 text{_RERUN}") from None
    except json.JSONDecodeError as e:
        raise CacheError(f"{mf}: not valid JSON ({e.msg}, line {e.lineno}){_RERUN}") from None
    return _check_manifest(man, mf)


def verify_cache(path: str | Path) -> list[str]:
    """Re-hash every shard against the manifest. Returns a list of problems (empty: the cache is sound)."""
    path = Path(path)
    man = load_manifest(path)
    problems = []
    listed = {s["file"] for s in man["shards"]}
    for s in man["shards"]:
        f = path / s["file"]
        if not f.is_file():
            problems.append(f"{s['file']}: missing")
        elif f.stat().st_size != s["bytes"]:
            problems.append(f"{s['file']}: {f.stat().st_size} bytes, manifest says {s['bytes']} (truncated or grown)")
        elif sha256_file(f) != s["sha256"]:
            problems.append(f"{s['file']}: sha256 mismatch (content changed)")
    for f in sorted(path.glob("shard-*.safetensors")):
        if f.name not in listed:
            problems.append(f"{f.name}: extra shard not listed in the manifest")
    return problems + teacher_tokenizer_problems(path, man)


TEACHER_TOKENIZER = "teacher_tokenizer"  # a cross-tokenizer cache keeps the teacher's tokenizer here


def teacher_tokenizer_problems(path: Path, man: dict[str, Any]) -> list[str]:
    """A cross-tokenizer cache's ``teacher_tokenizer/`` against the sha256 of each file the manifest lists."""
    want = man.get("teacher_tokenizer_files")
    if want is None:
        return []
    d = path / TEACHER_TOKENIZER
    have = dir_files(d) if d.is_dir() else {}
    out = [f"{TEACHER_TOKENIZER}/{n}: {'missing' if n not in have else 'sha256 mismatch (content changed)'}"
           for n in sorted(want) if have.get(n) != want[n]]
    return out + [f"{TEACHER_TOKENIZER}/{n}: extra file not listed in the manifest" for n in sorted(set(have) - set(want))]


@dataclass
class CachedRow:
    pos: np.ndarray  # int32 [n] prediction positions
    ids: np.ndarray  # [n, K]
    logprobs: np.ndarray  # [n, K]
    tail: np.ndarray  # float32 [n] log tail mass


class TeacherCache:
    """A complete cache directory, opened for reading.

    Each shard is re-hashed the first time it is read; a corrupt shard raises
    :class:`CacheError` naming it instead of feeding wrong targets to training.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self.components = self.manifest["components"]
        self.top_k = int(self.components["top_k"])
        self.temperature = float(self.components["temperature"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self._shard_rows = int(self.components["shard_rows"])
        self._loaded: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def check_compatible(self, **wanted: Any) -> None:
        """Raise :class:`CacheMismatch` naming the first field that differs (data, tokenizer, top_k, ...)."""
        for field, value in wanted.items():
            if value is None:
                continue
            if field not in self.components:
                raise KeyError(f"unknown cache key field {field!r}")
            if self.components[field] != value:
                raise CacheMismatch(field, self.components[field], value, self.path)

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._loaded:
            meta = self.manifest["shards"][i]
            f = self.path / shard_name(i)
            if not f.is_file():
                raise CacheError(f"{f}: shard missing (run `kdkit cache verify {self.path}`)")
            # The bytes hashed are the bytes decoded, at every read from disk: a shard rewritten while a run
            # reads the cache is refused when it is next read, not trusted from an earlier check.
            data = f.read_bytes()
            if hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise CacheError(f"{f}: sha256 does not match the manifest; the shard is corrupt "
                                 f"(run `kdkit cache verify {self.path}`, then precompute again)")
            if len(self._loaded) >= 4:  # shuffled batches touch several shards; keep memory bounded
                self._loaded.pop(next(iter(self._loaded)))
            tensors = load_bytes(data)
            tensors["ids"] = decode_ids(tensors, self.vocab_size)  # ids packed in ⌈log2 V⌉ bits above 2^16
            tensors["logprobs"] = decode_logprobs(tensors)  # the opt-in 8-bit encoding
            self._loaded[i] = tensors
        return self._loaded[i]

    def row(self, r: int) -> CachedRow:
        if not 0 <= r < len(self):
            raise IndexError(f"row {r} out of range for a cache of {len(self)} rows")
        sh = self._shard(r // self._shard_rows)
        j = r % self._shard_rows
        lo, hi = int(sh["row_offsets"][j]), int(sh["row_offsets"][j + 1])
        return CachedRow(sh["pos"][lo:hi], sh["ids"][lo:hi], sh["logprobs"][lo:hi], sh["tail"][lo:hi])

    def topk_batch(self, rows: list[int], seq_len: int, expected_pos: list[np.ndarray] | None = None) -> TopK:
        """TopK[B, seq_len, K] aligned with collated prediction positions, with the stored float32 tail mass;
        -inf where nothing is stored.

        ``expected_pos``: the loss positions of each row from the tokenised data; a
        difference means the cache does not belong to this data.
        """
        ids = torch.zeros((len(rows), seq_len, self.top_k), dtype=torch.long)
        lps = torch.full((len(rows), seq_len, self.top_k), float("-inf"), dtype=torch.float32)
        tail = torch.full((len(rows), seq_len), float("-inf"), dtype=torch.float32)
        for b, r in enumerate(rows):
            cr = self.row(r)
            if expected_pos is not None and not np.array_equal(cr.pos, expected_pos[b]):
                raise CacheMismatch(f"row {r} loss positions", cr.pos.tolist()[:8], expected_pos[b].tolist()[:8],
                                    self.path)
            if len(cr.pos) and int(cr.pos.max()) >= seq_len:
                raise CacheError(f"{self.path}: row {r} has positions up to {int(cr.pos.max())} >= batch length {seq_len}")
            p = torch.from_numpy(cr.pos.astype(np.int64))
            ids[b, p] = torch.from_numpy(cr.ids.astype(np.int64))
            lps[b, p] = torch.from_numpy(cr.logprobs.astype(np.float32))
            tail[b, p] = torch.from_numpy(cr.tail.astype(np.float32))
        return TopK(ids=ids, logprobs=lps, tail=tail)

    def check_student_vocab(self, tokenizer_sha: str, student_vocab_rows: int) -> None:
        """Refuse a student whose tokenizer differs; allow padded embedding rows (masked by the trainer)."""
        if tokenizer_sha != self.components["tokenizer"]:
            raise CacheMismatch("tokenizer", self.components["tokenizer"], tokenizer_sha, self.path)
        real = int(self.manifest["tokenizer"].get("vocab_size", self.vocab_size))
        if student_vocab_rows < real:
            raise CacheError(f"{self.path}: the tokenizer has {real} tokens but the student only {student_vocab_rows} "
                             f"output rows; teacher ids would fall outside the student's logits")
