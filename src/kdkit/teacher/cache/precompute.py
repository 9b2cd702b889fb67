"""``kdkit precompute``: run the teacher once over a dataset and store its top-K log-probs.

Shards hold contiguous row ranges and are written in row order whatever order the
batches ran in. A shard is complete when its file and its sidecar (with the
file's sha256) both exist; a rerun skips complete shards after re-hashing them,
so a killed run resumes and ends with the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as st_save

from kdkit.data import rows as kdata
from kdkit.loss.divergences import TopK
from kdkit.models.load import (
    load_causal_lm,
    load_tokenizer,
    model_fingerprint,
    pad_id,
    sha256_file,
    target_logits,
    tokenizer_fingerprint,
)
from kdkit.teacher.cache.format import (
    FORMAT_VERSION,
    KEY_FILE,
    LOGPROB_DTYPES,
    MANIFEST_FILE,
    CacheError,
    CacheMismatch,
    content_key,
    encode_ids,
    encode_logprobs,
    first_difference,
    id_encoding,
    shard_name,
    sidecar_name,
)
from kdkit.teacher.cache.reader import TEACHER_TOKENIZER, load_manifest, verify_cache
from kdkit.teacher.fleet import Fleet
from kdkit.util.environment import compute_environment
from kdkit.util.environment import differences as environment_differences
from kdkit.util.errors import UsageError
from kdkit.util.faults import kill_if
from kdkit.util.identity import dir_files
from kdkit.util.io import atomic_write_bytes, atomic_write_json, fsync_dir, remove_stale_tmp, storage
from kdkit.util.progress import Ticker, bar_shown

FAULT_ENV = "KDKIT_FAULT_PRECOMPUTE"


@dataclass(frozen=True)
class PrecomputeSettings:
    top_k: int = 64
    temperature: float = 1.0
    batch_size: int = 8
    max_length: int = 1024
    dtype: str = "float32"
    logprob_dtype: str = "float16"
    shard_rows: int = 256
    on_empty: str = "skip"
    truncation: str = "left"
    student_tokenizer: str | None = None  # a student with another tokenizer: cache at its aligned positions
    teacher_url: str | tuple[str, ...] | None = None  # a teacher served by vLLM (several: one fleet); ``teacher`` is
    # then its tokenizer (and weights)
    served_model: str | None = None  # the model name the server must serve (None: its only one)
    mixed_environments: bool = False  # accept shards from another compute environment (each one's recorded)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UsageError(f"--top-k must be >= 1, got {self.top_k}")
        if not self.temperature > 0:
            raise UsageError(f"--temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1 or self.shard_rows < 1:
            raise UsageError("--batch-size and --shard-rows must be >= 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UsageError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise UsageError(f"--logprob-dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {self.logprob_dtype!r}")


def _fault(point: str, shard: int) -> None:
    """Fault injection for the crash tests: KDKIT_FAULT_PRECOMPUTE=<point>:<shard> kills -9 there."""
    kill_if(FAULT_ENV, f"{point}:{shard}")


@torch.no_grad()
def teacher_topk(model: Any, batch: kdata.Batch, top_k: int, temperature: float, real_vocab: int
                 ) -> tuple[TopK, torch.Tensor, torch.Tensor]:
    """Teacher top-K at the target positions of a batch, row-major (row 0's targets first).

    Returns (TopK[N, K] float32 log-probs under the full softmax at ``temperature``, log tail mass [N],
    entropy [N]); log-softmax, top-K and entropy are computed at target positions only.
    """
    lp = torch.log_softmax(target_logits(model, batch, real_vocab).float() / temperature, dim=-1)
    k = min(top_k, lp.shape[-1])
    vals, ids = lp.topk(k, dim=-1, sorted=True)
    entropy = -(lp.exp() * lp).sum(-1)
    tk = TopK(ids=ids, logprobs=vals)
    return tk, tk.tail_logmass(), entropy


@torch.no_grad()
def _cross_batch(model: Any, rows: list[kdata.TokenizedRow], teacher_tok: Any, s: PrecomputeSettings
                 ) -> tuple[list[np.ndarray], TopK, torch.Tensor, torch.Tensor]:
    """A teacher with another tokenizer over student rows: each row's text tokenised the teacher's way and its
    top-K taken at the positions aligned with the student's targets (``kdkit.loss.crosstok``). Returns the student
    prediction positions per row and the TopK, log tail mass and entropy, row-major."""
    from kdkit.loss.crosstok import teacher_view
    from kdkit.teacher.crosstok import aligned_teacher_logits

    views = [teacher_view(r.text, r.offsets, r.loss_mask, teacher_tok) for r in rows]
    logits, _, _ = aligned_teacher_logits(model, teacher_tok, views, next(model.parameters()).device)
    lp = torch.log_softmax(logits.float() / s.temperature, dim=-1)
    vals, top = lp.topk(min(s.top_k, lp.shape[-1]), dim=-1, sorted=True)
    tk = TopK(ids=top, logprobs=vals)
    pos = [np.asarray([j - 1 for j, _ in pairs], dtype=np.int32) for _, pairs in views]
    return pos, tk, tk.tail_logmass(), -(lp.exp() * lp).sum(-1)


Capture = Callable[[list[kdata.TokenizedRow]], tuple[list[np.ndarray], TopK, torch.Tensor, torch.Tensor | None]]
"""A teacher over a batch of rows: each row's prediction positions, and there, row-major, the TopK, the log
tail mass and the entropy (None from a server, which returns the top-K alone)."""


def served_capture(server: Any, s: PrecomputeSettings) -> Capture:
    """A teacher served by vLLM: one request per batch (a fleet answers ``server.width`` batches at once); the
    tail mass is 1 − Σ of the K probabilities, summed in float64."""
    def capture(rows: list[kdata.TokenizedRow]) -> tuple[list[np.ndarray], TopK, torch.Tensor, None]:
        per_row = server.prompt_topk([r.input_ids for r in rows], s.top_k)
        positions = [r.loss_positions() for r in rows]
        tk = TopK(*(torch.cat([getattr(t, f)[torch.from_numpy(p.astype(np.int64))]
                               for t, p in zip(per_row, positions, strict=True)]) for f in ("ids", "logprobs", "tail")))
        return positions, tk, tk.tail, None

    capture.width = getattr(server, "width", 1)  # type: ignore[attr-defined]
    return capture


def local_capture(model: Any, s: PrecomputeSettings, real_vocab: int, pad: int, teacher_tok: Any = None) -> Capture:
    """A model in this process (another tokenizer: the positions aligned with the student's)."""
    def capture(rows: list[kdata.TokenizedRow]) -> tuple[list[np.ndarray], TopK, torch.Tensor, torch.Tensor]:
        if teacher_tok is not None:
            return _cross_batch(model, rows, teacher_tok, s)
        tk, tail, ent = teacher_topk(model, kdata.collate(rows, pad), s.top_k, s.temperature, real_vocab)
        return [r.loss_positions() for r in rows], tk, tail, ent

    return capture


def _shard_bytes(rows: list[kdata.TokenizedRow], capture: Capture, s: PrecomputeSettings, vocab: int,
                 on_tokens: Callable[[int], None]) -> tuple[bytes, dict[str, Any]]:
    per_row: list[tuple[np.ndarray, ...] | None] = [None] * len(rows)
    ent_sum: float | None = 0.0
    batches = kdata.length_sorted_batches([len(r.input_ids) for r in rows], s.batch_size)
    for idx, (positions, tk, tail, ent) in zip(batches, _in_order(capture, [[rows[i] for i in idx] for idx in batches]),
                                               strict=True):
        start = 0
        for i, pos in zip(idx, positions, strict=True):
            seg = slice(start, start + len(pos))
            start += len(pos)
            per_row[i] = (
                pos,
                tk.ids[seg].numpy(),
                tk.logprobs[seg].numpy(),
                tail[seg].numpy().astype(np.float32),
            )
            ent_sum = None if ent is None or ent_sum is None else ent_sum + float(ent[seg].double().sum())
            on_tokens(len(pos))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r[0]) for r in per_row])
    tensors = {
        "pos": np.concatenate([r[0] for r in per_row]).astype(np.int32),
        **encode_ids(np.concatenate([r[1] for r in per_row]), vocab),
        **encode_logprobs(np.concatenate([r[2] for r in per_row]), s.logprob_dtype),
        "tail": np.concatenate([r[3] for r in per_row]),
        "row_offsets": offsets,
    }
    stats = {"tokens": int(offsets[-1]), "entropy_sum": ent_sum}
    return st_save(tensors), stats


def _in_order(capture: Capture, batches: list[list[kdata.TokenizedRow]]) -> Iterator[tuple[Any, ...]]:
    """Each batch's capture, in order; a fleet's batches are asked ``capture.width`` at a time (each request
    whole to one server, so the answers are those of one server asked batch by batch)."""
    width = getattr(capture, "width", 1)
    if width <= 1:
        yield from map(capture, batches)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="kdkit-capture") as pool:
        yield from pool.map(capture, batches)


def _prepare_dir(out: Path, components: dict[str, Any], key: str) -> bool:
    """Create or re-open ``out``; returns True when the cache is already complete."""
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    key_path = out / KEY_FILE
    if key_path.is_file():
        try:
            cached = json.loads(key_path.read_text(encoding="utf-8"))
            cached_components = cached["components"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise CacheError(f"{key_path}: unreadable (not the JSON object kdkit writes); the cache's identity is "
                             f"unknown — precompute into a new directory") from None
        diff = first_difference(cached_components, components)
        if diff is not None:
            raise CacheMismatch(diff[0], diff[1], diff[2], out)
        return (out / MANIFEST_FILE).is_file()
    if any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise CacheError(f"{out}: directory is not empty and holds no {KEY_FILE}; refusing to write a cache into it")
    atomic_write_json(key_path, {"key": key, "components": components})
    return False


def _damage(out: Path, key: str) -> list[str]:
    """What is wrong with a cache whose manifest exists: an unreadable manifest, another key, bad shards."""
    try:
        man = load_manifest(out)
    except CacheError as e:
        return [str(e).split(" (the manifest is damaged")[0]]
    if man["key"] != key:
        return [f"{MANIFEST_FILE}: key {man['key'][:12]} is not this cache's {key[:12]}"]
    problems = verify_cache(out)
    listed = {s["file"] for s in man["shards"]}
    for f in sorted(out.glob("shard-*.safetensors")):
        if f.name not in listed:  # a shard file past the data's end: not part of this cache
            f.unlink()
            f.with_suffix(".json").unlink(missing_ok=True)
    return problems


def _sound(out: Path, key: str, log: Callable[[str], None]) -> bool:
    """A complete cache: True when every shard verifies; else its manifest is removed (the cache is
    incomplete again) so that the run recomputes what is damaged."""
    damage = _damage(out, key)
    if not damage:
        log(f"{out}: cache already complete (key {key[:12]}), every shard verified; nothing to do")
        return True
    log(f"{out}: the cache is damaged ({'; '.join(damage)}); recomputing what is damaged")
    (out / MANIFEST_FILE).unlink()
    fsync_dir(out)
    return False


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    """A shard's sidecar, or None when it is absent or unreadable (the shard is then recomputed)."""
    try:
        side = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return side if isinstance(side, dict) else None


def _ranks() -> tuple[int, int]:
    """(rank, world size): under ``torchrun`` the shards are split across processes (gloo is enough: only
    barriers and one broadcast travel between them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _from_rank0(value: bool, world: int) -> bool:
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


@dataclass
class Scan:
    """What one streaming pass over the data tells before any shard is computed."""

    fingerprint: str  # :func:`kdkit.data.rows.data_fingerprint` of every row
    report: kdata.TokenizeReport
    longest: int  # tokens in the longest row


def _rows(tokenizer: Any, data_path: str | Path, s: PrecomputeSettings, cross: bool, rep: kdata.TokenizeReport
          ) -> Iterator[kdata.TokenizedRow]:
    """The data's tokenised rows, one at a time, in the file's order."""
    return kdata.iter_tokenized(tokenizer, data_path, kdata.iter_examples(data_path), rep,
                                max_length=s.max_length, on_empty=s.on_empty, offsets=cross)


def _scan(tokenizer: Any, data_path: str | Path, s: PrecomputeSettings, cross: bool) -> Scan:
    """The first pass: the rows' fingerprint, counts and longest row, holding one row at a time (a corpus
    larger than memory is read twice rather than held)."""
    rep, h, longest = kdata.TokenizeReport(truncation=s.truncation), kdata.RowHash(), 0
    for row in _rows(tokenizer, data_path, s, cross, rep):
        h.update(row)
        longest = max(longest, len(row.input_ids))
    return Scan(h.hexdigest(), rep, longest)


def _shard_rows(tokenizer: Any, data_path: str | Path, s: PrecomputeSettings, cross: bool, h: kdata.RowHash
                ) -> Iterator[list[kdata.TokenizedRow]]:
    """The second pass: the rows of shard 0, 1, ... (``shard_rows`` each), one shard in memory at a time;
    ``h`` hashes them as they go by (the caller checks the file did not change between the passes)."""
    shard: list[kdata.TokenizedRow] = []
    for row in _rows(tokenizer, data_path, s, cross, kdata.TokenizeReport(truncation=s.truncation)):
        h.update(row)
        shard.append(row)
        if len(shard) == s.shard_rows:
            yield shard
            shard = []
    if shard:
        yield shard


def _server(s: PrecomputeSettings, cross: bool, longest: int, log: Callable[[str], None]) -> Any:
    """The teacher server of ``--teacher-url`` (None without one), after refusing what it cannot capture."""
    if s.teacher_url is None:
        return None
    from kdkit.teacher.fleet import connect

    if cross:
        raise UsageError("--teacher-url with --student-tokenizer: a served teacher is captured at the student's "
                         "own positions (one tokenizer); precompute a teacher with another tokenizer locally")
    server = connect(s.teacher_url, s.served_model, log=log)
    refused = server.refusal(s.top_k, s.temperature, longest)
    if refused is not None:
        what, why = refused
        given = {"temperature": s.temperature, "top_k": s.top_k, "max_length": s.max_length}[what]
        raise UsageError(f"--{what.replace('_', '-')} {given} with --teacher-url: {why}")
    return server


def _teacher_identity(teacher: str | Path, server: Any) -> dict[str, Any]:
    """What identifies the teacher: its config and weights; served: the model the server names and, where
    ``teacher`` holds the weights, their fingerprint (a directory with the tokenizer alone gives none)."""
    if server is None:
        return model_fingerprint(teacher)
    local = model_fingerprint(teacher) if any(Path(teacher).glob("*.safetensors")) else None
    served = {**server.info(), "max_logprobs": server.max_logprobs()}
    blob = json.dumps({"served_model": served["model"], "weights": local and local["sha256"]}, sort_keys=True)
    return {"sha256": hashlib.sha256(blob.encode()).hexdigest(), "served": served,
            "weights": local["weights"] if local else None, "weights_sha256": local and local["sha256"]}


def _capture(teacher: str | Path, server: Any, s: PrecomputeSettings, teacher_tok: Any, tokenizer: Any, cross: bool,
             data_path: str | Path, log: Callable[[str], None]) -> tuple[Capture, int, dict[str, Any]]:
    """The capture, the vocabulary rows its ids index and the compute environment its bytes come from: a local
    model, or the server (first checked against the local weights, when ``teacher`` holds them, on a few rows)."""
    if server is None:
        model = load_causal_lm(teacher, s.dtype)
        env = {**compute_environment(str(next(model.parameters()).device)), "dtype": s.dtype}
        return (local_capture(model, s, len(teacher_tok), pad_id(tokenizer), teacher_tok if cross else None),
                int(model.get_output_embeddings().weight.shape[0]), env)
    from kdkit.teacher import parity
    from kdkit.teacher.fleet import share

    prompts = parity.parity_prompts(teacher_tok, data_path, max_length=s.max_length)
    parity.check_servers(server, teacher_tok, data_path, prompts, min(s.top_k, 8), parity.TOLERANCE)
    if any(Path(teacher).glob("*.safetensors")):
        report = parity.teacher_parity(server, teacher, data_path, parity.PARITY_ROWS, min(s.top_k, 8), s.dtype,
                                       s.max_length)
        log(report.summary())
        report.raise_if_failed()
    cfg = Path(teacher) / "config.json"
    rows_cfg = json.loads(cfg.read_text()).get("vocab_size") if cfg.is_file() else None
    info = server.info()  # the log-probs come from the server's hardware; the tail is summed here in float64
    env = {"device": "served", "model": info["model"], "vllm_version": info["vllm_version"],
           "host": compute_environment("cpu")}
    return served_capture(share(server, *_ranks(), log), s), max(len(teacher_tok), int(rows_cfg or 0)), env


def _same_environment(shard: str, was: dict[str, Any] | None, now: dict[str, Any], s: PrecomputeSettings,
                      out: Path) -> None:
    """Refuse a shard written in another compute environment than this process's (unless
    ``mixed_environments``): the cache's bytes would be no single environment's. A shard from before
    kdkit recorded environments is taken as it is."""
    if was is None or s.mixed_environments:
        return
    diff = environment_differences(was, now)
    if diff:
        raise CacheError(f"{out / shard}: written in another compute environment than this precompute's "
                         f"({'; '.join(diff)}); resume it where it was written, precompute into a new directory, "
                         f"or pass --mixed-environments (the manifest then records each shard's environment)")


def _components(s: PrecomputeSettings, teacher: str, tokenizer: str, data: str, teacher_tokenizer: str | None
                ) -> dict[str, Any]:
    """What the cache's content key covers: the teacher, the tokenizer, the rows and every capture setting
    (a teacher with another tokenizer: its tokenizer too, since the cache holds its ids)."""
    out = {"format_version": FORMAT_VERSION, "teacher": teacher, "tokenizer": tokenizer, "data": data,
           "top_k": s.top_k, "temperature": s.temperature, "max_length": s.max_length, "dtype": s.dtype,
           "logprob_dtype": s.logprob_dtype, "shard_rows": s.shard_rows}
    if teacher_tokenizer is not None:
        out["teacher_tokenizer"] = teacher_tokenizer
    return out


def _data_tokenizer(teacher_tok: Any, student: str | None) -> tuple[Any, bool]:
    """The tokenizer the data is read with — the student's when it has another one — and whether it does."""
    if student is None:
        return teacher_tok, False
    student_tok = load_tokenizer(student)
    if tokenizer_fingerprint(student_tok)["sha256"] == tokenizer_fingerprint(teacher_tok)["sha256"]:
        raise UsageError(f"--student-tokenizer {student}: the teacher has the same tokenizer; leave the option out")
    return student_tok, True


def precompute(
    teacher: str | Path,
    data_path: str | Path,
    out: str | Path,
    settings: PrecomputeSettings = PrecomputeSettings(),
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build (or resume, or confirm) the cache in ``out``; returns the manifest. A full disk or a read-only
    directory stops it with one :class:`kdkit.util.errors.StorageError`; a rerun resumes from the complete shards."""
    with storage(Path(out)):
        return _precompute(teacher, data_path, Path(out), settings, progress, log)


def _precompute(teacher: str | Path, data_path: str | Path, out: Path, settings: PrecomputeSettings, progress: bool,
                log: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.perf_counter()
    teacher_tok = load_tokenizer(teacher)
    tokenizer, cross = _data_tokenizer(teacher_tok, settings.student_tokenizer)
    scan = _scan(tokenizer, data_path, settings, cross)
    rep = scan.report
    if rep.truncated:
        log(f"{rep.truncated} of {rep.rows} rows were truncated to max_length={settings.max_length} "
            f"({settings.truncation})")
    if rep.empty:
        log(f"skipped {len(rep.empty)} rows with no target token (lines {rep.empty[:10]})")
    server = _server(settings, cross, scan.longest, log)
    t_fp, k_fp = _teacher_identity(teacher, server), tokenizer_fingerprint(tokenizer)
    components = _components(settings, t_fp["sha256"], k_fp["sha256"], scan.fingerprint,
                             tokenizer_fingerprint(teacher_tok)["sha256"] if cross else None)
    key = content_key(components)
    rank, world = _ranks()
    done = _prepare_dir(out, components, key) and _sound(out, key, log) if rank == 0 else False
    if _from_rank0(done, world):
        return load_manifest(out)
    if rank == 0:
        remove_stale_tmp(out)
    _barrier(world)  # no rank writes a shard before rank 0 has cleaned up

    if settings.top_k > len(teacher_tok):
        raise UsageError(f"--top-k {settings.top_k} exceeds the vocabulary ({len(teacher_tok)} tokens)")
    capture, vocab, env = _capture(teacher, server, settings, teacher_tok, tokenizer, cross, data_path, log)
    n_shards = (rep.rows + settings.shard_rows - 1) // settings.shard_rows
    second = kdata.RowHash()
    _write_shards(out, _shard_rows(tokenizer, data_path, settings, cross, second), capture, settings, vocab, env,
                  (rep.target_tokens, n_shards), progress, log)

    if isinstance(server, Fleet):
        log(server.tally())
    if second.hexdigest() != scan.fingerprint:
        raise CacheError(f"{data_path}: the rows changed while precompute read them (their fingerprint differs "
                         f"between the first and the second pass); run it again on a file that stays put")
    _barrier(world)  # every shard is written; rank 0 writes the manifest from their sidecars
    if rank != 0:
        _barrier(world)
        return load_manifest(out)
    shards_meta = [_read_sidecar(out / sidecar_name(i)) for i in range(n_shards)]
    for m in shards_meta:  # other ranks' shards: each rank checked its own against itself
        _same_environment(m["file"], m.get("environment"), env, settings, out)
    if cross:  # training matches the two vocabularies without the teacher model at hand
        shutil.rmtree(out / TEACHER_TOKENIZER, ignore_errors=True)  # ours (inside the cache): written afresh
        teacher_tok.save_pretrained(str(out / TEACHER_TOKENIZER))
    manifest = _manifest(out, key, components, settings, teacher, t_fp, k_fp, vocab, rep.rows, shards_meta)
    if cross:  # checked like the shards: `cache verify`, validate and train refuse an edited teacher tokenizer
        manifest["teacher_tokenizer_files"] = dir_files(out / TEACHER_TOKENIZER)
    atomic_write_json(out / MANIFEST_FILE, manifest)
    _barrier(world)
    elapsed = time.perf_counter() - t0
    log(f"wrote {out}: {manifest['tokens']} tokens in {n_shards} shards, "
        f"{manifest['bytes_per_token']:.1f} bytes/token (target <= {4.25 * settings.top_k + 16:.0f}), "
        f"{elapsed:.1f}s; the rows streamed from {data_path}, at most {min(settings.shard_rows, rep.rows)} "
        f"in memory at a time (--shard-rows)")
    return manifest


def _write_shards(out: Path, shards: Iterable[list[Any]], capture: Any, settings: PrecomputeSettings, vocab: int,
                  env: dict[str, Any], sizes: tuple[int, int], progress: bool, log: Callable[[str], None]) -> None:
    """Compute and write this rank's shards (under torchrun rank r takes shards r, r + N, ...; every rank reads
    every shard's rows, so the rows' second fingerprint is whole); a shard whose sidecar matches its bytes and
    rows is kept once its environment is checked against this one. ``sizes``: target tokens, shards."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    (total_tokens, n_shards), (rank, world) = sizes, _ranks()
    columns = [TextColumn("precompute"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
               TextColumn("{task.fields[rate]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn()]
    computed_tokens, t_compute = 0, 0.0
    shown = bar_shown(progress) and rank == 0
    ticker = Ticker("precompute", total_tokens, "target tokens", log, enabled=not shown and rank == 0)
    with Progress(*columns, disable=not shown, transient=False) as bar:
        task = bar.add_task("precompute", total=total_tokens, rate="-")
        for i, shard_rows in enumerate(shards):
            if i % world != rank:
                continue
            lo, hi = i * settings.shard_rows, i * settings.shard_rows + len(shard_rows)
            spath, cpath = out / shard_name(i), out / sidecar_name(i)
            side = _read_sidecar(cpath)
            if side and spath.is_file() and side.get("sha256") == sha256_file(spath) and side.get("rows") == [lo, hi]:
                _same_environment(spath.name, side.get("environment"), env, settings, out)
                bar.advance(task, side["tokens"])
                continue
            ts = time.perf_counter()

            def on_tokens(n: int, i: int = i) -> None:
                bar.advance(task, n)
                ticker.update(int(bar.tasks[0].completed), f"shard {i + 1}/{n_shards}")

            blob, stats = _shard_bytes(shard_rows, capture, settings, vocab, on_tokens)
            atomic_write_bytes(spath, blob, before_rename=lambda i=i: _fault("mid_shard", i))
            side = {"file": spath.name, "rows": [lo, hi], "sha256": sha256_file(spath), "bytes": len(blob), **stats,
                    "environment": env}
            atomic_write_json(cpath, side)
            t_compute += time.perf_counter() - ts
            computed_tokens += stats["tokens"]
            bar.update(task, rate=f"{computed_tokens / max(t_compute, 1e-9):,.0f}")
            _fault("after_shard", i)


def _manifest(out: Path, key: str, components: dict[str, Any], s: PrecomputeSettings, teacher: str | Path,
              t_fp: dict[str, Any], k_fp: dict[str, Any], vocab: int, n_rows: int,
              shards_meta: list[dict[str, Any]]) -> dict[str, Any]:
    from safetensors.numpy import load_file

    tail = TailStats()
    for m in shards_meta:  # one shard at a time: the statistics of any number of tokens in fixed memory
        tail.add(np.exp(load_file(str(out / m["file"]))["tail"].astype(np.float64)))
    tokens = int(sum(m["tokens"] for m in shards_meta))
    nbytes = int(sum(m["bytes"] for m in shards_meta))
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "components": components,
        "teacher": {"path": str(Path(teacher)), **t_fp},
        "tokenizer": k_fp,
        "vocab_size": vocab,
        "settings": asdict(s),
        "encoding": {"ids": id_encoding(vocab), "logprobs": s.logprob_dtype, "tail": "float32",
                     "pos": "int32", "row_offsets": "int64"},
        "rows": n_rows,
        "tokens": tokens,
        "bytes": nbytes,
        "bytes_per_token": nbytes / max(tokens, 1),
        "shards": [{k: m[k] for k in ("file", "rows", "sha256", "bytes", "tokens")} for m in shards_meta],
        **_environments(shards_meta),
        "stats": {
            "tail_mass_mean": tail.mean(),
            "tail_mass_p50": tail.percentile(50),
            "tail_mass_p95": tail.percentile(95),
            "teacher_entropy_mean": None if any(m["entropy_sum"] is None for m in shards_meta) else
            float(sum(m["entropy_sum"] for m in shards_meta) / max(tokens, 1)),
            "tokens_stored": tokens,
        },
    }


def _environments(shards_meta: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's ``environment``: the one every shard was written in, or (mixed, as asked) each shard's."""
    envs = [m.get("environment") for m in shards_meta]
    first = next((e for e in envs if e is not None), None)
    if all(e is None or not environment_differences(e, first) for e in envs):
        return {"environment": first}
    return {"environment": "mixed", "shard_environments": {m["file"]: m.get("environment") for m in shards_meta}}


class TailStats:
    """The tail mass's mean (exact) and percentiles (to 1/65536: a histogram of [0, 1]), added a shard at a time."""

    BINS = 1 << 16

    def __init__(self) -> None:
        self.n, self.total = 0, 0.0
        self.counts = np.zeros(self.BINS, dtype=np.int64)

    def add(self, tail: np.ndarray) -> None:
        self.n += tail.size
        self.total += float(tail.sum())
        idx = np.clip((tail * self.BINS).astype(np.int64), 0, self.BINS - 1)
        self.counts += np.bincount(idx, minlength=self.BINS)

    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def percentile(self, q: float) -> float:
        """The centre of the bin holding the q-th percentile (0 without tokens)."""
        if not self.n:
            return 0.0
        b = int(np.searchsorted(np.cumsum(self.counts), q / 100.0 * self.n))
        return (min(b, self.BINS - 1) + 0.5) / self.BINS
