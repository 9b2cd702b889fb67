"""Cross-tokenizer distillation primitives: ULD against float64, span alignment over texts two tokenizers
split differently, and GOLD equal to the same-tokenizer divergence when the tokenizers are one."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kdkit.crosstok import VocabMap, align, gold, spans, uld
from kdkit.demo.tokenizer import build_char_tokenizer
from kdkit.losses import token_divergence
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
