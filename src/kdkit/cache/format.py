"""On-disk format of the teacher cache: names, encodings, the content key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.errors import KdkitError

FORMAT_VERSION = 1
KEY_FILE = "key.json"
MANIFEST_FILE = "manifest.json"
LOGPROB_DTYPES = {"float16": np.float16, "float32": np.float32}

# The fields of the content key, in the order they are reported when they differ.
KEY_FIELDS = ("format_version", "teacher", "tokenizer", "data", "top_k", "temperature", "max_length", "dtype",
              "logprob_dtype", "shard_rows")


class CacheError(KdkitError, RuntimeError):
    """The cache cannot be used: corrupt, incomplete, or not a kdkit cache."""


class CacheMismatch(CacheError):
    """The cache was made from other inputs or settings than the ones asked for."""

    def __init__(self, field: str, cached: Any, wanted: Any, where: Path) -> None:
        self.field, self.cached, self.wanted = field, cached, wanted
        super().__init__(
            f"{where}: cache field '{field}' is {cached!r} but {wanted!r} was asked for "
            f"(the cache was made from other inputs or settings; precompute a new one)"
        )


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def sidecar_name(i: int) -> str:
    return f"shard-{i:05d}.json"


def id_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """Smallest unsigned integer type that holds every token id."""
    if vocab_size <= 1 << 8:
        return np.uint8
    if vocab_size <= 1 << 16:
        return np.uint16
    return np.uint32


def content_key(components: dict[str, Any]) -> str:
    missing = [f for f in KEY_FIELDS if f not in components]
    if missing:
        raise ValueError(f"content key is missing {missing}")
    blob = json.dumps({f: components[f] for f in KEY_FIELDS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def first_difference(cached: dict[str, Any], wanted: dict[str, Any]) -> tuple[str, Any, Any] | None:
    for f in KEY_FIELDS:
        if cached.get(f) != wanted.get(f):
            return f, cached.get(f), wanted.get(f)
    return None
