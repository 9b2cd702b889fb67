"""Cross-tokenizer distillation primitives: ULD against float64, span alignment over texts two tokenizers
split differently, and GOLD equal to the same-tokenizer divergence when the tokenizers are one."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kdkit.demo.tokenizer import build_char_tokenizer
from kdkit.loss.crosstok import VocabMap, align, gold, spans, uld
from kdkit.loss.divergences import token_divergence
from tests.reference import softmax64

TEXTS = [
    "def f(x):\n    return x * 2\n",  # code indentation
    "  two  spaces\tand a tab\n\n",  # whitespace runs
    "naïve café — ✓ déjà vu",  # unicode (outside the char tokenizer: <unk> characters)
    "x = x = x",
]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process: merges words and indentation the char tokenizer keeps apart."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS * 20 + ["def g(y):\n    return y + 1\n"] * 20, trainer)
    from tokenizers import decoders

    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _offsets(tok, text: str) -> list[tuple[int, int]]:
    return [tuple(o) for o in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def test_uld_equals_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 7, generator=g)
    for temp in (1.0, 2.0):
        got = uld(s, t, temp)
        for n in range(5):
            ps = sorted(softmax64(s[n] / temp).tolist(), reverse=True)
            pt = sorted(softmax64(t[n] / temp).tolist(), reverse=True) + [0.0] * 4
            assert float(got[n]) == pytest.approx(sum(abs(a - b) for a, b in zip(pt, ps, strict=True)), rel=1e-5)
    assert torch.allclose(uld(s, s), torch.zeros(5), atol=1e-6)  # same distribution: 0
    # a permutation of the vocabulary changes nothing: ULD compares sorted probabilities only
    assert torch.allclose(uld(s, s[:, torch.randperm(11, generator=g)]), torch.zeros(5), atol=1e-6)


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_maps_every_character_once(text):
    char, bpe = build_char_tokenizer(), bpe_tokenizer()
    a, b = _offsets(char, text), _offsets(bpe, text)
    assert a != b  # the two tokenizers split this text differently
    cover = [0] * len(text)
    for lo, hi in spans(a, b, len(text)):
        for c in range(lo, hi):
            cover[c] += 1
    assert cover == [1] * len(text)
    pairs = align(a, b, list(range(len(a))), len(text))
    assert pairs and all(a[j][0] == b[i][0] for j, i in pairs)
    starts = {lo for lo, _ in spans(a, b, len(text))}
    assert {a[j][0] for j, _ in pairs} <= starts
    # identical tokenizers: every token (but the first, which has no position before it) aligns with itself
    assert align(a, a, list(range(len(a))), len(text)) == [(j, j) for j in range(1, len(a))]


@pytest.mark.parametrize("kind", ["kl_fwd", "kl_rev", "jsd", "tvd"])
def test_gold_with_one_tokenizer_equals_the_same_tokenizer_divergence(kind):
    tok = build_char_tokenizer()
    vmap = VocabMap.build(tok, tok, len(tok), len(tok))
    assert len(vmap.student) == len(tok) and torch.equal(vmap.student, vmap.teacher)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, len(tok), generator=g), torch.randn(6, len(tok), generator=g)
    for temp in (1.0, 2.0):
        want = token_divergence(s, t, kind, temperature=temp)
        assert torch.allclose(gold(s, t, vmap, kind, temperature=temp), want, atol=1e-5)


def test_gold_across_vocabularies_splits_matched_and_unmatched_mass():
    char, bpe = build_char_tokenizer(), bpe_tokenizer()
    vmap = VocabMap.build(char, bpe, len(char), len(bpe))
    # the single characters both vocabularies hold match; merged BPE tokens do not
    assert 20 < len(vmap.student) < len(bpe)
    assert char.convert_ids_to_tokens(int(vmap.student[vmap.teacher.tolist().index(bpe.convert_tokens_to_ids("x"))])) == "x"
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, len(char), generator=g), torch.randn(3, len(bpe), generator=g)
    out = gold(s, t, vmap, "kl_fwd")
    assert out.shape == (3,) and torch.isfinite(out).all() and (out > 0).all()
    s.requires_grad_(True)
    gold(s, t, vmap, "kl_fwd").sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- training across tokenizers


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from tests.helpers import save_model_dir, tiny_llama, toy_rows, write_jsonl

    root = tmp_path_factory.mktemp("crosstok_world")
    save_model_dir(root / "student", seed=2, hidden=16)
    save_model_dir(root / "same_teacher", seed=1, hidden=32)
    bpe = bpe_tokenizer()
    teacher = tiny_llama(len(bpe), seed=1, hidden=32)
    with torch.no_grad():  # a confident teacher: a near-uniform one gives ULD no gradient (sorted vectors never cross)
        teacher.lm_head.weight.mul_(40.0)
    teacher.save_pretrained(str(root / "bpe_teacher"), safe_serialization=True)
    bpe.save_pretrained(str(root / "bpe_teacher"))
    write_jsonl(root / "train.jsonl", toy_rows(12))
    return root


def _cross_cfg(root, tmp, teacher: str, cross: str, cache=None, **objective):
    import yaml

    from kdkit.config.load import load_train_config

    body = {"student": {"path": str(root / "student")},
            "teacher": {"cache": str(cache)} if cache else {"model": str(root / teacher)},
            "data": {"train": str(root / "train.jsonl"), "max_length": 96},
            "objective": {"ce_coef": 0.0, "kd_weight": 1.0, "kd": {"cross_tokenizer": cross}, **objective},
            "optim": {"lr": 1e-2, "micro_batch": 4, "epochs": 4, "schedule": "constant"},
            "checkpoint": {"every": 0}}
    p = tmp / f"cfg-{cross}-{teacher}-{len(list(tmp.glob('cfg-*')))}.yaml"
    p.write_text(yaml.safe_dump(body))
    return load_train_config(p)


@pytest.mark.parametrize("cross", ["gold", "uld"])
def test_kd_across_tokenizers_falls_and_uses_aligned_positions(world, tmp_path, cross):
    import json

    from kdkit.train import train

    train(_cross_cfg(world, tmp_path, "bpe_teacher", cross), tmp_path / "run", progress=False, log=lambda m: None)
    epochs = [json.loads(x) for x in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()]
    kl = [e["kl_loss"] for e in epochs]
    assert kl[-1] < 0.9 * kl[0], kl
    # only aligned positions carry KD: fewer than the target tokens (the BPE merges characters), more than none
    from kdkit.data import rows as kdata
    from kdkit.models.load import load_causal_lm, load_tokenizer
    from kdkit.teacher.signals import CrossSignal

    tok, bpe = load_tokenizer(world / "student"), load_tokenizer(world / "bpe_teacher")
    rows, _ = kdata.load_dataset(tok, world / "train.jsonl", max_length=96, offsets=True)
    sig = CrossSignal(load_causal_lm(world / "bpe_teacher"), bpe, rows, VocabMap.build(tok, bpe, len(tok), len(bpe)),
                      cross)
    batch = kdata.collate(rows[:4], tok.pad_token_id, [0, 1, 2, 3])
    ct = sig(batch, None)
    n_targets = int((batch.targets != -100).sum())
    assert 4 <= len(ct.rows) < n_targets and ct.logits.shape == (len(ct.rows), len(bpe))
    for b, p in zip(ct.rows.tolist(), ct.pos.tolist(), strict=True):
        assert batch.targets[b, p] != -100  # every aligned position predicts a target token


def test_the_cross_path_with_one_tokenizer_equals_the_same_tokenizer_kl(world):
    from kdkit.config.schema import ObjectiveConfig
    from kdkit.data import rows as kdata
    from kdkit.models.load import load_causal_lm, load_tokenizer
    from kdkit.teacher.signals import CrossSignal
    from kdkit.train.objective import compute_objective

    tok = load_tokenizer(world / "student")
    rows, _ = kdata.load_dataset(tok, world / "train.jsonl", max_length=96, offsets=True)
    teacher, student = load_causal_lm(world / "same_teacher"), load_causal_lm(world / "student")
    sig = CrossSignal(teacher, tok, rows, VocabMap.build(tok, tok, len(tok), len(tok)), "gold")
    batch = kdata.collate(rows[:4], tok.pad_token_id, [0, 1, 2, 3])
    with torch.no_grad():
        s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    cfg = ObjectiveConfig(ce_coef=0.0, kd={"kind": "kl_fwd", "temperature": 2.0})
    cross = compute_objective(s, batch.targets, cfg, teacher=sig(batch, student))
    same = compute_objective(s, batch.targets, cfg, teacher=t)
    # every target token aligns with itself (the char tokenizer's prompt and completion split at a character)
    assert cross.floats()["kd_tokens"] == same.floats()["kd_tokens"]
    assert cross.floats()["total_loss"] == pytest.approx(same.floats()["total_loss"], rel=1e-5)


def test_a_teacher_with_another_tokenizer_needs_a_cross_loss_and_vice_versa(world, tmp_path):
    from kdkit.data import rows as kdata
    from kdkit.models.load import load_tokenizer
    from kdkit.teacher.signals import SourceError
    from kdkit.train.preflight import preflight as check_sources

    tok = load_tokenizer(world / "student")
    rows, _ = kdata.load_dataset(tok, world / "train.jsonl", max_length=96)
    with pytest.raises(SourceError, match="set objective.kd.cross_tokenizer: gold or uld"):
        check_sources(_cross_cfg(world, tmp_path, "bpe_teacher", "none"), rows, tok, len(tok))
    with pytest.raises(SourceError, match="objective.kd.cross_tokenizer: gold is for a teacher with another"):
        check_sources(_cross_cfg(world, tmp_path, "same_teacher", "gold"), rows, tok, len(tok))
    from kdkit.config.load import ConfigError

    with pytest.raises(ConfigError, match="objective.kd.kind: uld compares sorted probabilities"):
        _cross_cfg(world, tmp_path, "bpe_teacher", "uld", kd={"cross_tokenizer": "uld", "kind": "kl_rev"})


def test_resume_of_a_cross_tokenizer_run_is_bitwise_exact(world, tmp_path):
    import json

    import yaml

    from kdkit.train import train
    from tests.helpers import kill_then_resume

    cfg = _cross_cfg(world, tmp_path, "bpe_teacher", "gold", ce_coef=1.0)
    raw = cfg.model_dump(mode="json")
    raw["checkpoint"] = {"every": 3, "keep": 2}
    raw["student"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    path = tmp_path / "resume.yaml"
    from kdkit.config.load import load_train_config
    from kdkit.config.schema import RESOLVED_MARK

    path.write_text(RESOLVED_MARK + "\n" + yaml.safe_dump(raw))  # every field written out, as config.yaml is

    train(load_train_config(path), tmp_path / "full", progress=False, log=lambda m: None)
    kill_then_resume(path, tmp_path / "killed", "after_step:5")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("full", "killed")]
    assert [json.loads(x)["total_loss"] for x in rows[0]] == [json.loads(x)["total_loss"] for x in rows[1]]


@pytest.mark.parametrize("cross", ["gold", "uld"])
def test_a_cross_tokenizer_cache_at_full_k_equals_the_live_teacher(world, tmp_path, cross):
    from kdkit.config.schema import ObjectiveConfig
    from kdkit.data import rows as kdata
    from kdkit.models.load import load_causal_lm, load_tokenizer
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
    from kdkit.teacher.signals import CrossSignal, open_sources
    from kdkit.train.objective import compute_objective

    bpe = load_tokenizer(world / "bpe_teacher")
    precompute(world / "bpe_teacher", world / "train.jsonl", tmp_path / "cache",
               PrecomputeSettings(top_k=len(bpe), logprob_dtype="float32", max_length=96, temperature=2.0,
                                  student_tokenizer=str(world / "student")), progress=False, log=lambda m: None)
    cfg = _cross_cfg(world, tmp_path, "bpe_teacher", cross, cache=tmp_path / "cache",
                     kd={"cross_tokenizer": cross, "temperature": 2.0})
    tok = load_tokenizer(world / "student")
    rows, _ = kdata.load_dataset(tok, world / "train.jsonl", max_length=96, offsets=True)
    cached = open_sources(cfg, rows, tok, len(tok)).teacher
    live = CrossSignal(load_causal_lm(world / "bpe_teacher"), bpe, rows, cached.cross[0], cross)
    student = load_causal_lm(world / "student")
    batch = kdata.collate(rows[:4], tok.pad_token_id, [0, 1, 2, 3])
    with torch.no_grad():
        s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    ocfg = ObjectiveConfig(ce_coef=0.0, kd={"cross_tokenizer": cross, "temperature": 2.0})
    a = compute_objective(s, batch.targets, ocfg, teacher=cached(batch, student))
    b = compute_objective(s, batch.targets, ocfg, teacher=live(batch, student))
    assert a.floats()["kd_tokens"] == b.floats()["kd_tokens"] > 0
    assert a.floats()["total_loss"] == pytest.approx(b.floats()["total_loss"], rel=1e-4)


def test_training_from_a_cross_tokenizer_cache_and_the_refusals(world, tmp_path):
    import json

    from typer.testing import CliRunner

    from kdkit.cli import app
    from kdkit.train import train

    runner = CliRunner()
    res = runner.invoke(app, ["precompute", "--teacher", str(world / "bpe_teacher"), "--data",
                              str(world / "train.jsonl"), "--out", str(tmp_path / "cache"), "--top-k", "16",
                              "--max-length", "96", "--student-tokenizer", str(world / "student"), "--no-progress"],
                        terminal_width=300)
    assert res.exit_code == 0, res.output
    cfg = _cross_cfg(world, tmp_path, "bpe_teacher", "gold", cache=tmp_path / "cache")
    train(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    kl = [json.loads(x)["kl_loss"] for x in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()]
    assert kl[-1] < 0.9 * kl[0], kl
    from kdkit.data import rows as kdata
    from kdkit.models.load import load_tokenizer
    from kdkit.teacher.signals import SourceError
    from kdkit.train.preflight import preflight as check_sources

    tok = load_tokenizer(world / "student")
    rows, _ = kdata.load_dataset(tok, world / "train.jsonl", max_length=96)
    cfg = _cross_cfg(world, tmp_path, "bpe_teacher", "none", cache=tmp_path / "cache")
    with pytest.raises(SourceError, match="holds a teacher with another tokenizer; set objective.kd.cross_tokenizer"):
        check_sources(cfg, rows, tok, len(tok))
    same = runner.invoke(app, ["precompute", "--teacher", str(world / "same_teacher"), "--data",
                               str(world / "train.jsonl"), "--out", str(tmp_path / "c2"), "--student-tokenizer",
                               str(world / "student")], terminal_width=300)
    assert same.exit_code == 2 and "the teacher has the same tokenizer" in same.output
    # the cache's teacher tokenizer is verified like its shards: an edit is refused by verify, validate and train
    tcfg = tmp_path / "cache" / "teacher_tokenizer" / "tokenizer_config.json"
    tcfg.write_text(tcfg.read_text().replace("{", '{"model_max_length": 9, ', 1))
    ver = runner.invoke(app, ["cache", "verify", str(tmp_path / "cache")], terminal_width=300)
    assert ver.exit_code != 0 and "teacher_tokenizer/tokenizer_config.json: sha256 mismatch" in ver.output
    cfg = _cross_cfg(world, tmp_path, "bpe_teacher", "gold", cache=tmp_path / "cache")
    with pytest.raises(SourceError, match="teacher_tokenizer/tokenizer_config.json: sha256 mismatch"):
        check_sources(cfg, rows, tok, len(tok))
    with pytest.raises(SourceError, match="teacher_tokenizer/tokenizer_config.json: sha256 mismatch"):
        train(cfg, tmp_path / "run2", progress=False, log=lambda m: None)


def test_the_teacher_sees_the_text_the_student_kept_and_a_short_position_table_is_named(world, tmp_path):
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdkit.config.load import load_train_config
    from kdkit.data import rows as kdata
    from kdkit.loss.crosstok import teacher_view
    from kdkit.models.load import load_tokenizer
    from kdkit.train import train
    from kdkit.util.errors import KdkitError
    from tests.helpers import write_jsonl

    long = [{"prompt": f"def f{i}(x):\n    \"\"\"" + "Return x times three, plus one. " * 6 + "\"\"\"\n",
             "completion": f"    return x * 3 + {i}\n"} for i in range(8)]
    write_jsonl(tmp_path / "long.jsonl", long)
    tok, bpe = load_tokenizer(world / "student"), bpe_tokenizer()
    rows, _ = kdata.load_dataset(tok, tmp_path / "long.jsonl", max_length=24, offsets=True)
    for r, src in zip(rows, long, strict=True):
        whole = src["prompt"] + src["completion"]
        assert r.truncated and whole.endswith(r.text) and len(r.text) <= 24  # left truncation: the end is kept
        assert all(0 <= a <= b <= len(r.text) for a, b in r.offsets)
        ids, _ = teacher_view(r.text, r.offsets, r.loss_mask, bpe)
        assert len(ids) <= len(r.text) + 2 < len(bpe(whole)["input_ids"])  # bounded by the kept span
    # a teacher with 48 positions: the kept text fits; the whole rows would not (about 100 tokens)
    cfg = LlamaConfig(vocab_size=len(bpe), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "short"), safe_serialization=True)
    bpe.save_pretrained(str(tmp_path / "short"))
    body = {"student": {"path": str(world / "student")}, "teacher": {"model": str(tmp_path / "short")},
            "data": {"train": str(tmp_path / "long.jsonl"), "max_length": 24},
            "objective": {"kd": {"cross_tokenizer": "gold"}}, "checkpoint": {"every": 0},
            "optim": {"lr": 1e-2, "micro_batch": 4, "epochs": 1}}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(body))
    assert train(load_train_config(tmp_path / "ok.yaml"), tmp_path / "ok", progress=False, log=lambda m: None)["steps"] == 2
    body["data"]["max_length"] = 400
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(KdkitError, match="has 48 positions; lower data.max_length"):
        train(load_train_config(tmp_path / "long.yaml"), tmp_path / "long", progress=False, log=lambda m: None)
