"""What identity checks cost: hashing a model directory (a run's inputs at start and --resume, a pack)
and re-hashing a cache shard at every read from disk.

    python benchmarks/identity.py [--model-mb 500] [--shard-mb 36] [--repeats 3]

Prints JSON, then a markdown table. The model is a directory of random bytes of the given size in
safetensors-sized files (hashing does not look at the contents); the shard is a real cache shard
of random top-K rows of about the given size, read with and without the check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_bytes
from safetensors.numpy import load_file, save_file

from kdkit.util.identity import path_identity


def _model_dir(root: Path, mb: int) -> Path:
    d = root / "model"
    d.mkdir()
    left, i = mb, 0
    while left > 0:
        part = min(left, 256)
        (d / f"model-{i:05d}.safetensors").write_bytes(os.urandom(part << 20))
        left, i = left - part, i + 1
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).write_text("{}")
    return d


def _shard(root: Path, mb: int) -> Path:
    k = 64
    n = (mb << 20) // (k * 6 + 8)  # uint32 ids, float16 log-probs, float32 tail, int32 position
    rng = np.random.default_rng(0)
    f = root / "shard-00000.safetensors"
    save_file({"ids": rng.integers(0, 49152, (n, k), dtype=np.uint32), "logprobs": rng.standard_normal((n, k)).astype(
        np.float16), "tail": rng.standard_normal(n).astype(np.float32), "pos": np.arange(n, dtype=np.int32)}, str(f))
    return f


def _time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-mb", type=int, default=500)
    ap.add_argument("--shard-mb", type=int, default=36)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, shard = _model_dir(root, a.model_mb), _shard(root, a.shard_mb)
        plain, checked = [], []
        for _ in range(a.repeats):  # interleaved: the machine's speed drifts
            plain.append(_time(lambda: load_file(str(shard)), 1))

            def read_checked() -> None:
                data = shard.read_bytes()
                hashlib.sha256(data).hexdigest()
                load_bytes(data)

            checked.append(_time(read_checked, 1))
        res = {"model_mb": a.model_mb, "model_identity_s": _time(lambda: path_identity(model), a.repeats),
               "shard_mb": round(shard.stat().st_size / 2**20, 1), "shard_read_s": statistics.median(plain),
               "shard_read_checked_s": statistics.median(checked)}
    res["shard_check_overhead"] = res["shard_read_checked_s"] / res["shard_read_s"]
    print(json.dumps(res, indent=1))
    print("\n| what | size | seconds |\n|---|---|---|")
    print(f"| model directory identity (run start, --resume, pack) | {a.model_mb} MB | {res['model_identity_s']:.2f} |")
    print(f"| shard read, unchecked | {res['shard_mb']} MB | {res['shard_read_s']:.3f} |")
    print(f"| shard read, sha256 of the bytes decoded | {res['shard_mb']} MB | {res['shard_read_checked_s']:.3f} "
          f"({res['shard_check_overhead']:.2f}x) |")


if __name__ == "__main__":
    main()
