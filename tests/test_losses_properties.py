"""Invariants of the divergences, over random inputs (hypothesis) and edge values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdkit.loss.divergences import KINDS, TAIL_POLICIES, TopK, token_divergence

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def logits_pair(draw, max_v=40):
    rows = draw(st.integers(1, 4))
    vocab = draw(st.integers(2, max_v))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g) * scale
    t = torch.randn(rows, vocab, generator=g) * scale
    return s, t


kinds = st.sampled_from(list(KINDS))
temps = st.sampled_from([0.5, 1.0, 2.0, 4.0])


def _value_at_identity(kind: str, s: torch.Tensor) -> torch.Tensor:
    """What a divergence equals when teacher == student: 0, except teacher_ce = entropy."""
    if kind != "teacher_ce":
        return torch.zeros(s.shape[:-1])
    lp = torch.log_softmax(s.double(), -1)
    return -(lp.exp() * lp).sum(-1).float()


@SETTINGS
@given(logits_pair(), kinds, temps, st.sampled_from([0.0, 0.3, 1.0]))
def test_identical_inputs_give_zero(pair, kind, temperature, beta):
    s, _ = pair
    out = token_divergence(s, s.clone(), kind, temperature=temperature, beta=beta, t2_scale=False)
    torch.testing.assert_close(out, _value_at_identity(kind, s / temperature), atol=2e-6, rtol=1e-5)


@SETTINGS
@given(logits_pair(), kinds, temps, st.sampled_from([0.0, 0.3, 0.5, 1.0]), st.sampled_from([0.05, 0.5, 0.9]))
def test_divergences_are_nonnegative(pair, kind, temperature, beta, alpha):
    s, t = pair
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = token_divergence(s.to(dtype), t.to(dtype), kind, temperature=temperature, beta=beta, alpha=alpha)
        assert torch.isfinite(out).all()
        assert float(out.min()) >= -1e-6


@SETTINGS
@given(logits_pair(), temps)
def test_jsd_endpoints(pair, temperature):
    s, t = pair
    fwd = token_divergence(s, t, "kl_fwd", temperature=temperature)
    rev = token_divergence(s, t, "kl_rev", temperature=temperature)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.0, temperature=temperature), fwd)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1.0, temperature=temperature), rev)


@SETTINGS
@given(logits_pair(), kinds, st.sampled_from(TAIL_POLICIES), temps)
def test_k_equal_v_equals_dense(pair, kind, tail, temperature):
    s, t = pair
    lp = torch.log_softmax(t.double() / temperature, -1)
    vals, ids = lp.topk(t.shape[-1], -1)
    top = token_divergence(s, TopK(ids, vals.float()), kind, temperature=temperature, tail=tail, alpha=0.3)
    dense = token_divergence(s, t, kind, temperature=temperature, alpha=0.3)
    torch.testing.assert_close(top, dense, rtol=1e-4, atol=5e-5)


@SETTINGS
@given(logits_pair(), temps)
def test_temperature_keeps_the_softmax_ranking(pair, temperature):
    s, _ = pair
    ranked = torch.argsort(s, dim=-1, stable=True)
    scaled = torch.softmax(s / temperature, dim=-1)
    # probabilities, read in the order of the raw logits, never decrease
    ordered = torch.gather(scaled, -1, ranked)
    assert bool((ordered[..., 1:] >= ordered[..., :-1]).all())


@pytest.mark.parametrize("kind", list(KINDS))
def test_extreme_and_masked_logits_stay_finite(kind):
    s = torch.tensor([[1e4, -1e4, 0.0, float("-inf")], [0.0, 1.0, float("-inf"), 2.0]])
    t = torch.tensor([[-1e4, 1e4, float("-inf"), 3.0], [0.5, float("-inf"), float("-inf"), 1.0]])
    s_ = s.clone().requires_grad_(True)
    t_ = t.clone().requires_grad_(True)
    out = token_divergence(s_, t_, kind)
    out.sum().backward()
    assert torch.isfinite(out).all(), out
    assert torch.isfinite(s_.grad).all() and torch.isfinite(t_.grad).all()
    # a -inf entry never receives gradient
    assert float(s_.grad[0, 3]) == 0.0 and float(t_.grad[1, 1]) == 0.0


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("tail", TAIL_POLICIES)
def test_fully_masked_positions_give_zero(kind, tail):
    s = torch.full((2, 5), float("-inf")).requires_grad_(True)
    t = torch.randn(2, 5)
    out = token_divergence(s, t, kind)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2)) and torch.equal(s.grad, torch.zeros(2, 5))
    # a top-K teacher whose slots are all unused (-inf): 0 as well
    s2 = torch.randn(2, 5).requires_grad_(True)
    tk = TopK(torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), float("-inf")))
    out2 = token_divergence(s2, tk, kind, tail=tail)
    out2.sum().backward()
    assert torch.isfinite(out2).all() and torch.isfinite(s2.grad).all()


def test_masked_vocab_entry_equals_dropping_it():
    """A vocabulary entry at -inf on both sides contributes exactly nothing."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    s_m, t_m = torch.cat([s, torch.full((4, 1), float("-inf"))], -1), torch.cat([t, torch.full((4, 1), float("-inf"))], -1)
    for kind in KINDS:
        torch.testing.assert_close(token_divergence(s_m, t_m, kind), token_divergence(s, t, kind))


def test_kl_fwd_includes_teacher_entropy():
    """kl_fwd = teacher_ce − H(p_t): the conventions table's pin against torchtune's naming."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(6, 17, generator=g), torch.randn(6, 17, generator=g)
    lp_t = torch.log_softmax(t, -1)
    entropy = -(lp_t.exp() * lp_t).sum(-1)
    torch.testing.assert_close(token_divergence(s, t, "kl_fwd"), token_divergence(s, t, "teacher_ce") - entropy)
