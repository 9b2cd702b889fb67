"""kdkit.loss.divergences against the naive float64 references: values AND gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdkit.loss.divergences import AGGREGATIONS, KINDS, TAIL_POLICIES, TopK, aggregate, hinge, token_divergence
from tests.reference import ref_aggregate, ref_dense, ref_topk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (value rtol, value atol, grad rtol, grad atol). Inputs are quantised to the dtype
# BEFORE the reference sees them, so values stay float32-exact; gradients come
# back in the input dtype and carry its rounding.
TOL = {
    torch.float32: (2e-5, 2e-6, 1e-4, 2e-6),
    torch.bfloat16: (2e-5, 2e-6, 1.6e-2, 1e-4),
    torch.float16: (2e-5, 2e-6, 2e-3, 1e-5),
}


def _logits(shape, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _grads(fn, student, teacher, g_out):
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(True)
    out = fn(s, t)
    (out.double() * g_out).sum().backward()
    return out.detach(), s.grad, t.grad


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _kw(kind, beta=0.5, alpha=0.1):
    return {"beta": beta, "alpha": alpha}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", list(KINDS))
def test_dense_matches_reference(kind, temperature, dtype):
    shape = (3, 47, 97)
    student = _logits(shape, 1, dtype=dtype)
    teacher = _logits(shape, 2, dtype=dtype)
    g_out = _logits(shape[:-1], 3, scale=1.0).double()  # grad_output != 1
    kw = _kw(kind, beta=0.3, alpha=0.2)
    out, gs, gt = _grads(lambda s, t: token_divergence(s, t, kind, temperature=temperature, **kw), student, teacher, g_out)
    ref, rgs, rgt = _grads(
        lambda s, t: ref_dense(s, t, kind, temperature=temperature, **kw), student.double(), teacher.double(), g_out
    )
    assert out.dtype == torch.float32 and out.shape == shape[:-1]
    vr, va, gr, ga = TOL[dtype]
    _close(out, ref, vr, va * temperature**2, "value")
    assert gs.dtype == dtype
    _close(gs, rgs, gr, ga, "grad wrt student logits")
    _close(gt, rgt, gr, ga, "grad wrt teacher logits")


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(3, 47, 97), (5, 31), (2, 3, 5, 17), (1, 2)])
def test_jsd_beta_and_odd_shapes(beta, shape):
    student, teacher = _logits(shape, 4), _logits(shape, 5)
    g_out = _logits(shape[:-1], 6, scale=1.0).double()
    fn = lambda s, t: token_divergence(s, t, "jsd", beta=beta, temperature=2.0)  # noqa: E731
    rfn = lambda s, t: ref_dense(s, t, "jsd", beta=beta, temperature=2.0)  # noqa: E731
    out, gs, gt = _grads(fn, student, teacher, g_out)
    ref, rgs, rgt = _grads(rfn, student.double(), teacher.double(), g_out)
    _close(out, ref, 2e-5, 1e-5, "value")
    _close(gs, rgs, 1e-4, 2e-6, "grad student")
    _close(gt, rgt, 1e-4, 2e-6, "grad teacher")


@pytest.mark.parametrize("t2_scale", [True, False])
def test_t2_scale_multiplies_by_t_squared(t2_scale):
    # against the float64 reference (not against another call of the same function, which cannot fail)
    s, t = _logits((4, 9, 23), 7), _logits((4, 9, 23), 8)
    a = token_divergence(s, t, "kl_fwd", temperature=3.0, t2_scale=t2_scale)
    want = ref_dense(s, t, "kl_fwd", temperature=3.0, t2_scale=False) * (9.0 if t2_scale else 1.0)
    torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-7)
    unscaled = token_divergence(s, t, "kl_fwd", temperature=3.0, t2_scale=False)
    assert float(a.sum()) == pytest.approx(float(unscaled.sum()) * (9.0 if t2_scale else 1.0), rel=1e-5)
    assert float(unscaled.sum()) > 0


def _topk(teacher_logits, k, temperature=1.0):
    lp = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    return TopK(ids=ids, logprobs=vals.float())


@pytest.mark.parametrize("tail", TAIL_POLICIES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind", list(KINDS))
def test_topk_matches_reference(kind, temperature, tail):
    shape = (3, 11, 97)
    student = _logits(shape, 9)
    teacher = _topk(_logits(shape, 10), 13, temperature)
    g_out = _logits(shape[:-1], 11, scale=1.0).double()
    kw = _kw(kind, beta=0.3, alpha=0.2)
    s = student.clone().requires_grad_(True)
    out = token_divergence(s, teacher, kind, temperature=temperature, tail=tail, **kw)
    (out.double() * g_out).sum().backward()
    s64 = student.double().requires_grad_(True)
    ref = ref_topk(s64, teacher.ids, teacher.logprobs, kind, temperature=temperature, tail=tail, **kw)
    (ref * g_out).sum().backward()
    _close(out, ref, 1e-4, 1e-5, "value")
    _close(s.grad, s64.grad, 1e-3, 1e-5, "grad wrt student logits")


@pytest.mark.parametrize("tail", TAIL_POLICIES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_topk_with_k_equal_v_equals_dense(kind, tail):
    shape = (2, 13, 31)
    s, t = _logits(shape, 12), _logits(shape, 13)
    dense = token_divergence(s, t, kind, temperature=1.0)
    top = token_divergence(s, _topk(t, shape[-1]), kind, temperature=1.0, tail=tail)
    torch.testing.assert_close(top, dense, rtol=1e-4, atol=2e-5)


def test_topk_error_shrinks_as_k_grows():
    shape = (4, 16, 200)
    s, t = _logits(shape, 14), _logits(shape, 15)
    dense = token_divergence(s, t, "kl_fwd")
    errs = [float((token_divergence(s, _topk(t, k), "kl_fwd") - dense).abs().mean()) for k in (4, 16, 64, 200)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-5


def test_topk_bucket_counts_the_tail():
    # Teacher puts 0.5 on token 0 and spreads the rest; K=1 keeps only token 0.
    # Bucket: 2 outcomes (p_t = .5/.5 vs the student's own split). Renorm: both become 1 → 0.
    teacher = torch.tensor([[4.0, 1.0, 1.0, 1.0]])
    p0 = torch.softmax(teacher, -1)[0, 0]
    student = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    tk = _topk(teacher, 1)
    bucket = token_divergence(student, tk, "kl_fwd", tail="bucket")
    q0 = 0.25
    expected = p0 * math.log(p0 / q0) + (1 - p0) * math.log((1 - p0) / (1 - q0))
    assert float(bucket) == pytest.approx(float(expected), rel=1e-5)
    assert float(token_divergence(student, tk, "kl_fwd", tail="renorm")) == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------- aggregation


@pytest.mark.parametrize("how", list(AGGREGATIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aggregate_matches_reference(how, dtype):
    g = torch.Generator().manual_seed(20)
    v = (torch.rand(3, 47, generator=g) * 3).to(dtype)
    mask = torch.rand(3, 47, generator=g) > 0.3
    got = aggregate(v, mask, how)
    assert got.dtype == torch.float32 and got.dim() == 0
    expected = ref_aggregate(v.double().numpy(), mask.numpy(), how)
    assert float(got) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("how", list(AGGREGATIONS))
def test_aggregate_gradient(how):
    g = torch.Generator().manual_seed(21)
    v = (torch.rand(5, 13, generator=g, dtype=torch.float64) * 3).float()
    mask = torch.rand(5, 13, generator=g) > 0.4
    x = v.clone().requires_grad_(True)
    aggregate(x, mask, how).backward()
    sel = v.double()[mask]
    n = sel.numel()
    expected = torch.zeros_like(v, dtype=torch.float64)
    if how == "sum":
        expected[mask] = 1.0
    elif how == "mean":
        expected[mask] = 1.0 / n
    elif how == "rmse":
        expected[mask] = sel / (n * math.sqrt(float((sel**2).mean()) + 1e-8))
    elif how == "max":
        expected[mask] = (sel == sel.max()).double()
    elif how == "p95":
        # linear interpolation between the two order statistics around rank 0.95·(n−1)
        order = torch.argsort(sel)
        r = 0.95 * (n - 1)
        lo, frac = int(math.floor(r)), r - math.floor(r)
        gsel = torch.zeros(n, dtype=torch.float64)
        gsel[order[lo]] += 1 - frac
        gsel[order[min(lo + 1, n - 1)]] += frac
        expected[mask] = gsel
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-7)
    assert float(x.grad[~mask].abs().sum()) == 0.0


@pytest.mark.parametrize("how", list(AGGREGATIONS))
def test_aggregate_empty_mask_is_zero_with_zero_gradient(how):
    x = torch.rand(4, 6).requires_grad_(True)
    out = aggregate(x, torch.zeros(4, 6, dtype=torch.bool), how)
    out.backward()
    assert float(out.detach()) == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_rmse_at_zero_has_finite_gradient_even_from_fp16():
    # LoRA at init: every per-position KL is exactly 0; bare sqrt(0) has an infinite gradient.
    x = torch.zeros(2, 8, dtype=torch.float16).requires_grad_(True)
    out = aggregate(x, torch.ones(2, 8, dtype=torch.bool), "rmse")
    out.backward()
    assert float(out) == pytest.approx(1e-4, rel=1e-3)  # sqrt(1e-8)
    assert torch.isfinite(x.grad).all()


def test_p95_on_bf16_and_masked_nonfinite_values():
    v = torch.arange(100, dtype=torch.bfloat16)
    mask = torch.ones(100, dtype=torch.bool)
    assert float(aggregate(v, mask, "p95")) == pytest.approx(float(np.percentile(np.arange(100), 95)))
    v2 = torch.tensor([1.0, float("nan"), float("inf"), 3.0]).requires_grad_(True)
    m2 = torch.tensor([True, False, False, True])
    for how in AGGREGATIONS:
        out = aggregate(v2, m2, how)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(v2.grad).all(), how
        v2.grad = None


def test_hinge():
    x = torch.tensor(0.3, requires_grad=True)
    out = hinge(x, 0.5)
    out.backward()
    assert float(out) == 0.0 and float(x.grad) == 0.0
    y = torch.tensor(0.9, requires_grad=True)
    out = hinge(y, 0.5)
    out.backward()
    assert float(out) == pytest.approx(0.4) and float(y.grad) == 1.0


# --------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "kl"}, "unknown divergence kind 'kl'"),
        ({"kind": "jsd", "beta": 1.5}, "beta must lie in"),
        ({"kind": "skew_fwd", "alpha": 0.0}, "alpha must lie in"),
        ({"kind": "kl_fwd", "temperature": 0.0}, "temperature must be"),
        ({"kind": "kl_fwd", "tail": "drop"}, "unknown tail policy"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=match):
        token_divergence(s, s, **kwargs)


def test_topk_shape_and_range_errors():
    s = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="K=6 ids but the student vocabulary has V=5"):
        token_divergence(s, TopK(torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6)), "kl_fwd")
    with pytest.raises(ValueError, match="ids out of range"):
        token_divergence(s, TopK(torch.full((2, 2), 7), torch.zeros(2, 2)), "kl_fwd")
    with pytest.raises(ValueError, match="leading shape"):
        token_divergence(s, TopK(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)), "kl_fwd")
    with pytest.raises(ValueError, match="dense teacher logits shape"):
        token_divergence(s, torch.zeros(2, 6), "kl_fwd")
    with pytest.raises(ValueError, match="ids must be an integer tensor"):
        TopK(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(torch.zeros(3), torch.ones(3, dtype=torch.bool), "median")


@pytest.mark.parametrize("storage", ["float16", "uint8"])
def test_stored_tail_mass_beats_the_tail_recomputed_from_stored_logprobs(storage):
    """A confident teacher (tail mass ~1e-4 past K = 8) whose tail is shaped like the student's, so the bucket
    KL equals the dense KL exactly when the tail mass is exact: the float32 tail a cache stores keeps it
    there; the tail recomputed as 1 − Σ_K p from stored (rounded) log-probs does not."""
    from kdkit.teacher.cache.format import decode_logprobs, encode_logprobs

    g = torch.Generator().manual_seed(0)
    n, vocab, k = 256, 400, 8
    student = torch.randn(n, vocab, generator=g)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(n)])
    teacher = student.clone()
    teacher.scatter_add_(-1, ids, 12.0 + torch.rand(n, k, generator=g))  # tail ∝ the student's off the top K
    t_lp = torch.log_softmax(teacher.double(), -1)
    vals, ids = t_lp.topk(k, dim=-1)
    tail64 = torch.log1p(-torch.exp(torch.logsumexp(vals, -1)))
    assert 1e-5 < float(torch.exp(tail64).mean()) < 1e-3
    stored_lp = torch.from_numpy(decode_logprobs(encode_logprobs(vals.float().numpy(), storage))).float()
    dense = token_divergence(student, teacher, "kl_fwd")
    assert torch.allclose(dense.double(), ref_topk(student, ids, vals, "kl_fwd", tail="bucket"), atol=1e-5)
    stored = token_divergence(student, TopK(ids, stored_lp, tail64.float()), "kl_fwd", tail="bucket")
    recomputed = token_divergence(student, TopK(ids, stored_lp), "kl_fwd", tail="bucket")
    err_stored = float((stored - dense).abs().mean())
    err_recomputed = float((recomputed - dense).abs().mean())
    assert err_stored < 0.6 * err_recomputed, (err_stored, err_recomputed)  # measured: f16 0.41, uint8 0.53
    # the TopK carries its tail through selection, and tail_logmass() returns it
    sel = TopK(ids, stored_lp, tail64.float()).select(slice(3, 7))
    assert torch.equal(sel.tail_logmass(), tail64.float()[3:7])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_normalized_student_logprobs_give_the_same_divergence(kind):
    """The chunked path hands token_divergence the log-probs it computed for CE (T = 1): same values."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 40, generator=g), torch.randn(5, 40, generator=g)
    lp_t, ids = torch.log_softmax(t, -1).topk(8, dim=-1)
    for teacher in (t, TopK(ids, lp_t)):
        want = token_divergence(s, teacher, kind)
        got = token_divergence(torch.log_softmax(s, -1), teacher, kind, normalized=True)
        assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="temperature 1"):
        token_divergence(s, t, kind, temperature=2.0, normalized=True)


@pytest.mark.parametrize("kind", ["kl_fwd", "kl_rev"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_unmasked_fast_path_equals_the_masked_path_bit_for_bit(kind, temperature):
    """On CPU all-finite inputs skip the masked passes; a -inf elsewhere in the tensor forces them.
    The rows without one must agree exactly, values and gradients."""
    torch.manual_seed(0)
    s = torch.randn(4, 3, 57) * 3
    t = torch.randn(4, 3, 57) * 3
    t_masked = t.clone()
    t_masked[3, 2, 5] = float("-inf")
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fast = token_divergence(s1, t, kind, temperature=temperature)
    slow = token_divergence(s2, t_masked, kind, temperature=temperature)
    assert torch.equal(fast[:3], slow[:3]) and torch.equal(fast[3, :2], slow[3, :2])
    fast[:3].sum().backward()
    slow[:3].sum().backward()
    assert torch.equal(s1.grad, s2.grad)
