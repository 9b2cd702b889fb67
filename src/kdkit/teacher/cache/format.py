"""On-disk format of the teacher cache: names, encodings, the content key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.util.errors import KdkitError

FORMAT_VERSION = 1
KEY_FILE = "key.json"
MANIFEST_FILE = "manifest.json"
LOGPROB_DTYPES = {"float16": np.float16, "float32": np.float32, "uint8": np.uint8}  # uint8: lossy, opt-in

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


def id_bits(vocab_size: int) -> int:
    """⌈log2 V⌉: the bits an id takes on disk (at least 8; byte-aligned up to 16)."""
    bits = max(1, (vocab_size - 1).bit_length())
    return 8 if bits <= 8 else 16 if bits <= 16 else bits


def id_encoding(vocab_size: int) -> str:
    bits = id_bits(vocab_size)
    return f"uint{bits}" if bits in (8, 16) else f"uint16+{bits - 16}bit"


def encode_logprobs(lp: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """Top-K log-probs [N, K] (sorted, descending) as stored. ``float16``/``float32`` are casts; ``uint8`` is
    lossy: per position the top log-prob and the step (lp_0 − lp_{K−1}) / 255 in float16, and each
    log-prob as round((lp_0 − lp_j) / step) in one byte (error ≤ step / 2, largest for the least likely)."""
    if dtype != "uint8":
        return {"logprobs": lp.astype(LOGPROB_DTYPES[dtype])}
    lp = np.maximum(lp.astype(np.float32), -1e4)  # a masked (-inf) entry stays far below the rest, finite
    top = lp[:, :1].astype(np.float16).astype(np.float32)
    span = np.maximum(top - lp[:, -1:], 1e-6)
    step = (span / 255).astype(np.float16).astype(np.float32)
    step = np.where(step > 0, step, np.float32(1e-6))
    q = np.clip(np.rint((top - lp) / step), 0, 255).astype(np.uint8)
    return {"logprobs": q, "lp_top": top[:, 0].astype(np.float16), "lp_step": step[:, 0].astype(np.float16)}


def decode_logprobs(tensors: dict[str, np.ndarray]) -> np.ndarray:
    """float32 [N, K] log-probs of :func:`encode_logprobs`."""
    lp = tensors["logprobs"]
    if "lp_step" not in tensors:
        return lp
    return tensors["lp_top"].astype(np.float32)[:, None] - lp.astype(np.float32) * tensors["lp_step"].astype(
        np.float32)[:, None]


def encode_ids(ids: np.ndarray, vocab_size: int) -> dict[str, np.ndarray]:
    """Token ids in ⌈log2 V⌉ bits, losslessly: byte types up to V = 2^16; above, the low 16 bits as uint16
    (``ids``) and the high bits as little-endian bit planes packed 8 to a byte (``ids_hi``), so an id of
    V = 151,936 takes 18 bits, not 32."""
    bits = id_bits(vocab_size)
    if bits <= 16:
        return {"ids": ids.astype(id_dtype(vocab_size))}
    flat = ids.astype(np.uint32).reshape(-1)
    planes = ((flat[:, None] >> (16 + np.arange(bits - 16, dtype=np.uint32))) & 1).astype(np.uint8)
    return {"ids": (ids & 0xFFFF).astype(np.uint16), "ids_hi": np.packbits(planes.reshape(-1), bitorder="little")}


def decode_ids(tensors: dict[str, np.ndarray], vocab_size: int) -> np.ndarray:
    """The ids of :func:`encode_ids`, shape of ``tensors["ids"]``."""
    lo = tensors["ids"]
    if "ids_hi" not in tensors:
        return lo
    extra = id_bits(vocab_size) - 16
    planes = np.unpackbits(tensors["ids_hi"], count=lo.size * extra, bitorder="little").reshape(lo.size, extra)
    hi = (planes.astype(np.uint32) << np.arange(extra, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return (lo.astype(np.uint32).reshape(-1) | (hi << 16)).reshape(lo.shape)


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
