"""The teacher cache: determinism, crash-resume, verification, content key, reader."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.data.rows import collate, load_dataset
from kdkit.loss.divergences import token_divergence
from kdkit.models.load import load_causal_lm, load_tokenizer, tokenizer_fingerprint
from kdkit.teacher.cache import CacheError, CacheMismatch, TeacherCache, verify_cache
from kdkit.teacher.cache.precompute import FAULT_ENV, PrecomputeSettings, precompute
from tests.helpers import save_model_dir, toy_rows, write_jsonl

S = PrecomputeSettings(top_k=16, shard_rows=8, batch_size=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_world")
    teacher = save_model_dir(root / "teacher", seed=1)
    data = write_jsonl(root / "train.jsonl", toy_rows(30))
    return root, teacher, data


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


def _run(teacher, data, out, settings=S):
    return precompute(teacher, data, out, settings, progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def reference_cache(world):
    root, teacher, data = world
    out = root / "ref"
    _run(teacher, data, out)
    return out


def test_precompute_twice_gives_identical_bytes(world, reference_cache, tmp_path):
    _, teacher, data = world
    _run(teacher, data, tmp_path / "again")
    assert _files(tmp_path / "again") == _files(reference_cache)
    man = json.loads((reference_cache / "manifest.json").read_text())
    assert man["rows"] == 30 and len(man["shards"]) == 4
    assert man["bytes_per_token"] <= 4.25 * 16 + 16
    assert man["encoding"]["ids"] == "uint8"  # 101-token vocabulary
    assert 0.0 < man["stats"]["tail_mass_mean"] < 1.0


def test_rerun_on_a_complete_cache_changes_nothing(world, reference_cache):
    _, teacher, data = world
    before = _files(reference_cache)
    _run(teacher, data, reference_cache)
    assert _files(reference_cache) == before


@pytest.mark.parametrize("fault", ["after_shard:1", "mid_shard:2", "mid_shard:0"])
def test_kill_9_then_resume_gives_identical_bytes(world, reference_cache, tmp_path, fault):
    _, teacher, data = world
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kdkit", "precompute", "--teacher", str(teacher), "--data", str(data),
           "--out", str(out), "--top-k", "16", "--shard-rows", "8", "--batch-size", "3", "--no-progress"]
    env = {**os.environ, FAULT_ENV: fault}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match="incomplete"):
        TeacherCache(out)
    env.pop(FAULT_ENV)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _files(out) == _files(reference_cache)
    assert not list(out.glob(".*.tmp-*"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_verify_names_flipped_truncated_missing_and_extra_shards(reference_cache, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["cache", "verify", str(reference_cache)])
    assert ok.exit_code == 0
    assert verify_cache(reference_cache) == []

    flipped = _copy(reference_cache, tmp_path / "flip")
    f = flipped / "shard-00001.safetensors"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))
    res = runner.invoke(app, ["cache", "verify", str(flipped)])
    assert res.exit_code == 1 and "shard-00001.safetensors" in res.output and "sha256" in res.output
    with pytest.raises(CacheError, match="shard-00001.safetensors"):
        TeacherCache(flipped).topk_batch([10], 64)

    trunc = _copy(reference_cache, tmp_path / "trunc")
    f = trunc / "shard-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-7])
    assert any("shard-00002.safetensors" in p and "truncated" in p for p in verify_cache(trunc))

    missing = _copy(reference_cache, tmp_path / "missing")
    (missing / "shard-00000.safetensors").unlink()
    assert verify_cache(missing) == ["shard-00000.safetensors: missing"]

    extra = _copy(reference_cache, tmp_path / "extra")
    shutil.copy(extra / "shard-00000.safetensors", extra / "shard-00009.safetensors")
    assert verify_cache(extra) == ["shard-00009.safetensors: extra shard not listed in the manifest"]


@pytest.mark.parametrize(
    "change, field",
    [({"top_k": 8}, "top_k"), ({"temperature": 2.0}, "temperature"), ({"max_length": 64}, "max_length")],
)
def test_other_settings_are_refused_with_the_field_named(world, reference_cache, change, field):
    _, teacher, data = world
    settings = PrecomputeSettings(**{**S.__dict__, **change})
    with pytest.raises(CacheMismatch) as e:
        _run(teacher, data, reference_cache, settings)
    assert e.value.field == field


def test_other_data_is_refused(world, reference_cache, tmp_path):
    _, teacher, _ = world
    other = write_jsonl(tmp_path / "other.jsonl", toy_rows(30, seed=5))
    with pytest.raises(CacheMismatch) as e:
        _run(teacher, other, reference_cache)
    assert e.value.field == "data"
    cache = TeacherCache(reference_cache)
    with pytest.raises(CacheMismatch, match="'top_k' is 16 but 32"):
        cache.check_compatible(top_k=32)


def test_reader_topk_equals_live_teacher(world, reference_cache):
    _, teacher, data = world
    tok = load_tokenizer(teacher)
    rows, _ = load_dataset(tok, data, max_length=1024)
    model = load_causal_lm(teacher)
    cache = TeacherCache(reference_cache)
    idx = [0, 7, 8, 29]  # across shard boundaries
    batch = collate([rows[i] for i in idx], tok.pad_token_id, idx)
    seq = batch.targets.shape[1]
    cached = cache.topk_batch(idx, seq, [rows[i].loss_positions() for i in idx])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1], -1)
    live_vals, live_ids = lp.topk(16, -1)
    mask = batch.targets != -100
    assert torch.equal(cached.ids[mask], live_ids[mask])
    torch.testing.assert_close(cached.logprobs[mask], live_vals[mask], rtol=1e-3, atol=2e-3)
    assert torch.isinf(cached.logprobs[~mask]).all()


def test_student_tokenizer_check(world, reference_cache):
    _, teacher, _ = world
    cache = TeacherCache(reference_cache)
    sha = tokenizer_fingerprint(load_tokenizer(teacher))["sha256"]
    cache.check_student_vocab(sha, 101)
    cache.check_student_vocab(sha, 128)  # padded embedding rows are fine
    with pytest.raises(CacheMismatch, match="tokenizer"):
        cache.check_student_vocab("0" * 64, 101)
    with pytest.raises(CacheError, match="only 90"):
        cache.check_student_vocab(sha, 90)


def test_kl_from_full_k_cache_equals_dense_and_error_shrinks_with_k(world, tmp_path):
    _, teacher, data = world
    tok = load_tokenizer(teacher)
    rows, _ = load_dataset(tok, data, max_length=1024)
    idx = list(range(6))
    batch = collate([rows[i] for i in idx], tok.pad_token_id, idx)
    mask = batch.targets != -100
    model = load_causal_lm(teacher)
    with torch.no_grad():
        t_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    student = torch.randn(t_logits.shape, generator=torch.Generator().manual_seed(0)) * 0.5 + t_logits
    dense = token_divergence(student, t_logits, "kl_fwd")[mask]
    errs = []
    for k in (4, 32, 101):
        out = tmp_path / f"k{k}"
        _run(teacher, data, out, PrecomputeSettings(top_k=k, shard_rows=8, logprob_dtype="float32"))
        tk = TeacherCache(out).topk_batch(idx, t_logits.shape[1])
        errs.append(float((token_divergence(student, tk, "kl_fwd", tail="bucket")[mask] - dense).abs().max()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-4


def test_bad_data_row_is_named(world, tmp_path):
    _, teacher, _ = world
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    res = CliRunner().invoke(app, ["precompute", "--teacher", str(teacher), "--data", str(bad), "--out",
                                   str(tmp_path / "c"), "--no-progress"], terminal_width=300)
    assert res.exit_code == 2
    assert "bad.jsonl:2: field 'completion'" in " ".join(res.output.split())


def test_refuses_foreign_directory(world, tmp_path):
    _, teacher, data = world
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not empty"):
        _run(teacher, data, tmp_path / "x")


def test_cache_info_cli(reference_cache):
    res = CliRunner().invoke(app, ["cache", "info", str(reference_cache)], terminal_width=200)
    assert res.exit_code == 0
    man = json.loads((reference_cache / "manifest.json").read_text())
    assert f"{man['bytes_per_token']:.1f}" in res.output and str(man["tokens"]) in res.output
    assert np.isfinite(man["stats"]["teacher_entropy_mean"])


def _damage_flip(out: Path) -> None:
    f = out / "shard-00001.safetensors"
    b = bytearray(f.read_bytes())
    b[-3] ^= 0xFF
    f.write_bytes(bytes(b))


def _damage_truncate_shard(out: Path) -> None:
    f = out / "shard-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-40])


def _damage_delete_shard(out: Path) -> None:
    (out / "shard-00000.safetensors").unlink()


def _damage_truncate_manifest(out: Path) -> None:
    f = out / "manifest.json"
    f.write_bytes(f.read_bytes()[:100])


def _damage_empty_manifest(out: Path) -> None:
    (out / "manifest.json").write_text("{}")


def _damage_sidecar_and_shard(out: Path) -> None:
    (out / "shard-00003.json").write_text("not json")
    _damage_flip(out)


@pytest.mark.parametrize("damage", [_damage_flip, _damage_truncate_shard, _damage_delete_shard,
                                    _damage_truncate_manifest, _damage_empty_manifest, _damage_sidecar_and_shard])
def test_rerun_on_a_damaged_cache_repairs_it_to_the_same_bytes(world, reference_cache, tmp_path, damage):
    _, teacher, data = world
    out = tmp_path / "damaged"
    shutil.copytree(reference_cache, out)
    damage(out)
    with pytest.raises(CacheError):  # the reader never trains on it
        TeacherCache(out).topk_batch(list(range(30)), 128)
    said: list[str] = []
    precompute(teacher, data, out, S, progress=False, log=said.append)
    assert any("damaged" in m for m in said), said
    assert not any("nothing to do" in m for m in said)
    assert _files(out) == _files(reference_cache)
    assert verify_cache(out) == []


@pytest.mark.parametrize("text, field", [
    ("{}", "field 'format_version': field required"),
    ("[]", "expected a JSON object, got list"),
    ('{"format_version": 1', "not valid JSON"),
    (None, "field 'shards[1].sha256': field required"),
    ("\xff", "not valid JSON"),
])
def test_a_malformed_manifest_is_a_clear_error(reference_cache, tmp_path, text, field):
    out = tmp_path / "bad"
    shutil.copytree(reference_cache, out)
    if text is None:
        man = json.loads((out / "manifest.json").read_text())
        del man["shards"][1]["sha256"]
        text = json.dumps(man)
    (out / "manifest.json").write_text(text)
    for call in (lambda: TeacherCache(out), lambda: verify_cache(out)):
        with pytest.raises(CacheError, match=re.escape(field)):
            call()
    res = CliRunner().invoke(app, ["cache", "info", str(out)])
    assert res.exit_code == 2 and field in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("vocab", [101, 49_152, 65_536, 65_537, 151_936, 262_144])
def test_ids_are_stored_in_ceil_log2_v_bits_losslessly(vocab):
    from kdkit.teacher.cache.format import decode_ids, encode_ids, id_bits

    g = np.random.default_rng(vocab)
    ids = g.integers(0, vocab, size=(97, 64), dtype=np.int64)
    ids[0, :3] = [0, vocab - 1, vocab // 2]
    enc = encode_ids(ids, vocab)
    assert np.array_equal(decode_ids(enc, vocab), ids)
    nbytes = sum(a.nbytes for a in enc.values())
    bits = max(8, (vocab - 1).bit_length())
    assert id_bits(vocab) == (bits if bits > 16 else 16 if bits > 8 else 8)
    assert nbytes == -(-ids.size * id_bits(vocab) // 8)  # exactly ⌈log2 V⌉ bits per id (byte types up to 2^16)


def _big_vocab_world(root: Path, vocab: int) -> tuple[Path, Path]:
    """A tiny Llama whose tokenizer has `vocab` tokens (chars first, then synthetic ones)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kdkit.demo.tokenizer import CHARS, SPECIALS
    from tests.helpers import tiny_llama

    base = SPECIALS + CHARS
    names = base + [f"<t{i}>" for i in range(vocab - len(base))]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    model_dir = root / "big_teacher"
    tiny_llama(vocab, seed=7, hidden=16).save_pretrained(str(model_dir), safe_serialization=True)
    tok.save_pretrained(str(model_dir))
    return model_dir, write_jsonl(root / "big.jsonl", toy_rows(12))


def test_a_152k_vocabulary_cache_meets_the_bytes_per_token_target_and_reads_back_exactly(tmp_path):
    teacher, data = _big_vocab_world(tmp_path, 151_936)
    man = precompute(teacher, data, tmp_path / "cache", PrecomputeSettings(top_k=64, shard_rows=8, batch_size=4),
                     progress=False, log=lambda m: None)
    assert man["encoding"]["ids"] == "uint16+2bit"
    assert man["bytes_per_token"] <= 4.25 * 64 + 16
    tok = load_tokenizer(teacher)
    rows, _ = load_dataset(tok, data, max_length=1024)
    model = load_causal_lm(teacher)
    idx = [0, 9]
    batch = collate([rows[i] for i in idx], tok.pad_token_id, idx)
    cached = TeacherCache(tmp_path / "cache").topk_batch(idx, batch.targets.shape[1],
                                                          [rows[i].loss_positions() for i in idx])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1], -1)
    mask = batch.targets != -100
    live_ids = lp.topk(64, -1).indices[mask]
    assert int(cached.ids[mask].max()) > 1 << 16  # high bits were exercised
    assert (cached.ids[mask][:, :8] == live_ids[:, :8]).float().mean() > 0.99  # near-ties may swap deeper ranks
    res = CliRunner().invoke(app, ["cache", "info", str(tmp_path / "cache")], terminal_width=200)
    assert res.exit_code == 0 and "target <= 288" in res.output


def test_the_opt_in_8bit_logprobs_are_close_and_smaller(world, reference_cache, tmp_path):
    from kdkit.teacher.cache.format import decode_logprobs, encode_logprobs

    g = np.random.default_rng(0)
    lp = np.sort(np.log(g.dirichlet(np.full(500, 0.05), size=200)), axis=1)[:, ::-1][:, :64].astype(np.float32)
    lp = np.maximum(lp, -60.0)
    enc = encode_logprobs(lp, "uint8")
    step = enc["lp_step"].astype(np.float32)[:, None]
    err = np.abs(decode_logprobs(enc) - lp)
    assert (err <= step / 2 + 2e-3 * np.abs(lp[:, :1]) + 1e-3).all()
    _, teacher, data = world
    man = _run(teacher, data, tmp_path / "u8", PrecomputeSettings(top_k=16, shard_rows=8, batch_size=3,
                                                                  logprob_dtype="uint8"))
    ref = json.loads((reference_cache / "manifest.json").read_text())
    # 1 byte instead of 2 per log-prob (K = 16), + 4 bytes of scale per position, + two tensor headers per shard
    assert man["bytes_per_token"] < ref["bytes_per_token"] - 16 + 4 + 2
    a, b = TeacherCache(reference_cache), TeacherCache(tmp_path / "u8")
    for r in (0, 13, 29):
        ra, rb = a.row(r), b.row(r)
        assert np.array_equal(ra.ids, rb.ids)
        np.testing.assert_allclose(rb.logprobs, ra.logprobs.astype(np.float32), atol=0.05)


@pytest.mark.slow
def test_two_ranks_precompute_the_same_bytes_as_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m kdkit precompute` splits the shards across ranks; the cache equals one
    process's byte for byte (both with one thread per process: CPU kernels may sum in another order with
    another thread count)."""
    save_model_dir(tmp_path / "teacher", seed=1, hidden=32)
    write_jsonl(tmp_path / "data.jsonl", toy_rows(21))
    args = ["-m", "kdkit", "precompute", "--teacher", str(tmp_path / "teacher"), "--data",
            str(tmp_path / "data.jsonl"), "--top-k", "8", "--shard-rows", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert sum(f.startswith("shard-") and f.endswith(".safetensors") for f in files) == 6
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_a_shard_rewritten_while_a_run_reads_is_refused_when_it_is_read_again(world, tmp_path):
    _, teacher, data = world
    out = tmp_path / "c"
    _run(teacher, data, out, PrecomputeSettings(top_k=16, shard_rows=4, batch_size=3))
    cache = TeacherCache(out)
    first = cache.row(0)
    for r in range(4, 24, 4):  # five other shards: shard 0 leaves the reader's memory
        cache.row(r)
    shard = out / "shard-00000.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-3] ^= 0xFF  # rewritten on disk behind the run's back
    shard.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match="shard-00000.safetensors: sha256 does not match the manifest"):
        cache.row(0)
    assert first.ids.shape[1] == 16


def test_a_cache_tokenised_with_another_max_length_or_truncation_names_the_setting(world, tmp_path):
    from kdkit.config.schema import TrainConfig
    from kdkit.data import rows as kdata
    from kdkit.models.load import load_tokenizer
    from kdkit.teacher.signals import SourceError
    from kdkit.train.preflight import preflight as check_sources

    _, teacher, data = world
    rows = [{"prompt": f"def f{i}(x):" + " " * 20 + "\n", "completion": f"    return x * {i} + 1\n"} for i in range(4)]
    long_rows = write_jsonl(tmp_path / "long.jsonl", rows)
    _run(teacher, long_rows, tmp_path / "c", PrecomputeSettings(top_k=16, max_length=40))
    tok = load_tokenizer(teacher)
    for field, value, flag in (("max_length", 64, "--max-length 40"), ("truncation", "right", "--truncation left")):
        cfg = TrainConfig.model_validate({"student": {"path": str(teacher)}, "teacher": {"cache": str(tmp_path / "c")},
                                          "data": {"train": str(long_rows), "max_length": 40, field: value}})
        rows, _ = kdata.load_dataset(tok, long_rows, max_length=cfg.data.max_length, truncation=cfg.data.truncation)
        with pytest.raises(SourceError, match=f"data.{field} is .* precomputed with {flag}"):
            check_sources(cfg, rows, tok, len(tok))


def test_precompute_streams_the_rows_one_shard_in_memory_at_a_time(world, reference_cache, tmp_path, monkeypatch):
    """A corpus larger than memory: at every teacher call no more rows are alive than one shard's; the cache is
    the one built before streaming (the reference's bytes)."""
    import gc

    from kdkit.data.rows import TokenizedRow
    from kdkit.teacher.cache import precompute as pc

    _, teacher, data = world
    alive: list[int] = []
    make = pc.local_capture

    def counting(*a, **kw):
        inner = make(*a, **kw)

        def capture(rows):
            alive.append(sum(type(o) is TokenizedRow for o in gc.get_objects()))
            return inner(rows)
        return capture

    monkeypatch.setattr(pc, "local_capture", counting)
    _run(teacher, data, tmp_path / "streamed")
    assert _files(tmp_path / "streamed") == _files(reference_cache)
    assert len(alive) == 11  # 30 rows: shards of 8 (batches of 3, 3, 2) and one of 6 (3, 3)
    assert alive == [8] * 9 + [6, 6], alive  # one shard's rows at a time, never the corpus


def test_a_data_file_edited_between_the_two_passes_is_refused(world, tmp_path, monkeypatch):
    from kdkit.teacher.cache import precompute as pc

    _, teacher, _ = world
    data = write_jsonl(tmp_path / "rows.jsonl", toy_rows(10))
    scan = pc._scan

    def scan_then_edit(*a, **kw):
        out = scan(*a, **kw)
        write_jsonl(data, toy_rows(10, seed=5))
        return out

    monkeypatch.setattr(pc, "_scan", scan_then_edit)
    with pytest.raises(CacheError, match="the rows changed while precompute read them"):
        _run(teacher, data, tmp_path / "cache")
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_the_tail_statistics_match_numpy_to_the_histogram_step():
    from kdkit.teacher.cache.precompute import TailStats

    g = np.random.default_rng(0)
    tail = g.beta(0.5, 8.0, size=5000)
    st = TailStats()
    for part in np.array_split(tail, 7):
        st.add(part)
    assert st.mean() == pytest.approx(tail.mean(), rel=1e-12)
    for q in (50, 95):
        assert abs(st.percentile(q) - np.percentile(tail, q, method="inverted_cdf")) <= 1.0 / TailStats.BINS
    assert TailStats().percentile(50) == 0.0 and TailStats().mean() == 0.0


NATIVE = torch.backends.cpu.get_cpu_capability()
other_kernels = pytest.mark.skipif(NATIVE == "DEFAULT", reason="this CPU has no vector kernels to compare with")


def _capture_cmd(teacher, data, out, *extra):
    return [sys.executable, "-m", "kdkit", "precompute", "--teacher", str(teacher), "--data", str(data), "--out",
            str(out), "--top-k", "16", "--shard-rows", "8", "--batch-size", "3", "--no-progress", *extra]


def test_the_manifest_records_the_compute_environment(reference_cache):
    env = json.loads((reference_cache / "manifest.json").read_text())["environment"]
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["cpu_capability"] == NATIVE
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() and env["cpu"]
    side = json.loads((reference_cache / "shard-00000.json").read_text())
    assert side["environment"] == env
    info = CliRunner().invoke(app, ["cache", "info", str(reference_cache)], terminal_width=300)
    assert f"cpu_capability {NATIVE}" in info.output


@other_kernels
def test_a_resume_in_another_compute_environment_is_refused_naming_both(world, tmp_path):
    _, teacher, data = world
    out = tmp_path / "mixed"
    cmd = _capture_cmd(teacher, data, out)
    killed = subprocess.run(cmd, env={**os.environ, FAULT_ENV: "after_shard:1", "ATEN_CPU_CAPABILITY": "default"},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode != 0 and not (out / "manifest.json").exists()
    said = " ".join((refused.stdout + refused.stderr).split())
    assert f"shard-00000.safetensors: written in another compute environment than this precompute's " \
           f"(cpu_capability: 'DEFAULT' vs '{NATIVE}')" in said, said
    accepted = subprocess.run(cmd + ["--mixed-environments"], capture_output=True, text=True)
    assert accepted.returncode == 0, accepted.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["environment"] == "mixed"
    caps = [man["shard_environments"][s["file"]]["cpu_capability"] for s in man["shards"]]
    assert caps == ["DEFAULT", "DEFAULT", NATIVE, NATIVE]


def _naive_bucket_kl(a, b, vocab: int) -> np.ndarray:
    """KL(A ‖ B) per position in float64, loops: A's K ids and the rest; B's probability of an id it did not keep
    is its tail spread evenly over the V − K ids it did not keep; each side's rest is what A's ids leave."""
    out = []
    for j in range(len(a.pos)):
        bp = {int(i): float(np.exp(np.float64(lp))) for i, lp in zip(b.ids[j], b.logprobs[j], strict=True)}
        spread = float(np.exp(np.float64(b.tail[j]))) / (vocab - len(b.ids[j]))
        kl, q_sum = 0.0, 0.0
        for i, lp in zip(a.ids[j], a.logprobs[j], strict=True):
            p, q = float(np.exp(np.float64(lp))), bp.get(int(i), spread)
            kl, q_sum = kl + p * (np.log(p) - np.log(q)), q_sum + q
        p_rest = 1.0 - sum(float(np.exp(np.float64(lp))) for lp in a.logprobs[j])
        out.append(kl + p_rest * (np.log(p_rest) - np.log(1.0 - q_sum)))
    return np.asarray(out)


def test_cache_diff_of_two_teachers_against_float64_loops(world, reference_cache, tmp_path):
    from kdkit.teacher.cache.diff import _row, diff_caches
    from kdkit.teacher.parity import Agreement

    root, teacher, data = world
    other = save_model_dir(tmp_path / "other", seed=7)
    _run(other, data, tmp_path / "other-cache")
    d = diff_caches(reference_cache, tmp_path / "other-cache")
    assert d.key_fields == [f"teacher: {TeacherCache(reference_cache).components['teacher']!r} vs "
                            f"{TeacherCache(tmp_path / 'other-cache').components['teacher']!r}"]
    assert d.environment == [] and not d.passed and d.first_difference.startswith("row 0, position ")
    ca, cb = TeacherCache(reference_cache), TeacherCache(tmp_path / "other-cache")
    kls, deltas, same_sets, positions = [], [], 0, 0
    for r in range(len(ca)):
        ra, rb = ca.row(r), cb.row(r)
        kls.append(_naive_bucket_kl(ra, rb, ca.vocab_size))
        for j in range(len(ra.pos)):
            common = set(ra.ids[j].tolist()) & set(rb.ids[j].tolist())
            same_sets += len(common) == len(ra.ids[j])
            la = dict(zip(ra.ids[j].tolist(), ra.logprobs[j], strict=True))
            lb = dict(zip(rb.ids[j].tolist(), rb.logprobs[j], strict=True))
            deltas += [abs(float(la[i]) - float(lb[i])) for i in common]
        positions += len(ra.pos)
    naive = np.concatenate(kls)
    assert d.positions == positions and d.ids_differ == positions - same_sets
    assert d.bucket_kl_mean == pytest.approx(naive.mean(), rel=1e-4)
    assert d.bucket_kl_max == pytest.approx(naive.max(), rel=1e-4)
    assert d.max_abs == pytest.approx(max(deltas), abs=1e-6)
    assert d.mean_abs == pytest.approx(sum(deltas) / (positions * 16), rel=1e-5)  # over every slot, 0 where unheld
    # a cache against itself: nothing differs
    same = diff_caches(reference_cache, reference_cache)
    assert same.passed and same.max_abs == 0 and same.ids_differ == 0 and same.top1 == 1
    assert abs(same.bucket_kl_max) < 1e-5
    n, kl, bad = _row(ca.row(0), ca.row(0), ca.vocab_size, 1e-3, Agreement())
    assert n == 0 and bad is None


@other_kernels
def test_cache_diff_of_one_teacher_on_two_kernel_sets(world, reference_cache, tmp_path):
    # the same key, written by other kernels: the numbers a team needs to tell rounding from a wrong teacher
    _, teacher, data = world
    out = tmp_path / "default"
    proc = subprocess.run(_capture_cmd(teacher, data, out), env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["key"] == TeacherCache(reference_cache).manifest["key"]
    res = CliRunner().invoke(app, ["cache", "diff", str(reference_cache), str(out), "--json", str(tmp_path / "d.json")],
                             terminal_width=300)
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["key_fields"] == [] and f"cpu_capability: '{NATIVE}' vs 'DEFAULT'" in d["environment"]
    assert d["max_abs"] <= 1e-2 and d["top1"] >= 0.99, d  # float16 steps at most
    assert res.exit_code == (0 if d["passed"] else 1) and "key fields that differ: none" in res.output
    strict = CliRunner().invoke(app, ["cache", "diff", str(reference_cache), str(out), "--tolerance", "0"])
    assert strict.exit_code == (0 if d["max_abs"] == 0 else 1)
