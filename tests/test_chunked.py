"""The chunked CE + KD path equals the dense path: values and gradients (hidden, weight, bias)."""

from __future__ import annotations

import pytest
import torch

from kdkit.loss.chunked import IGNORE_INDEX, KDSpec, chunked_ce_kd
from kdkit.loss.divergences import KINDS, TAIL_POLICIES, TopK, token_divergence

N, H, V, K = 37, 24, 97, 9


def _inputs(seed, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.25] = IGNORE_INDEX
    t_logits = torch.randn(N, V, generator=g) * 2
    ce_w = torch.rand(N, generator=g)
    kd_w = torch.rand(N, generator=g) * 2
    return hidden, weight, b, targets, t_logits, ce_w, kd_w


def _topk(t_logits, temperature):
    vals, ids = torch.log_softmax(t_logits / temperature, -1).topk(K, -1)
    return TopK(ids, vals)


def _dense(hidden, weight, bias, targets, teacher, ce_w, kd_w, spec):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    valid = targets != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    loss = (torch.where(valid, ce, torch.zeros_like(ce)) * ce_w).sum()
    if teacher is not None:
        div = token_divergence(logits, teacher, spec.kind, temperature=spec.temperature, beta=spec.beta,
                               alpha=spec.alpha, tail=spec.tail)
        loss = loss + (torch.where(valid, div, torch.zeros_like(div)) * kd_w).sum()
    return loss


def _both(seed, teacher_kind, spec, chunk, dtype=torch.float32, grad_out=1.7):
    hidden, weight, bias, targets, t_logits, ce_w, kd_w = _inputs(seed, dtype)
    teacher = None if teacher_kind is None else (_topk(t_logits, spec.temperature) if teacher_kind == "topk" else t_logits)
    out = []
    for fn in ("chunked", "dense"):
        h, w, b = (x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias))
        if fn == "chunked":
            loss, _ = chunked_ce_kd(h, w, targets, bias=b, teacher=teacher, ce_weights=ce_w, kd_weights=kd_w, spec=spec,
                                    chunk_size=chunk)
        else:
            loss = _dense(h, w, b, targets, teacher, ce_w, kd_w, spec)
        (loss * grad_out).backward()
        out.append((loss.detach(), h.grad, w.grad, b.grad))
    return out


@pytest.mark.parametrize("chunk", [1, 8, 16, 37, 64])
@pytest.mark.parametrize("tail", TAIL_POLICIES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_topk_every_kind_equals_dense(kind, tail, chunk):
    spec = KDSpec(kind=kind, temperature=2.0, beta=0.3, alpha=0.2, tail=tail)
    (lc, hc, wc, bc), (ld, hd, wd, bd) = _both(1, "topk", spec, chunk)
    torch.testing.assert_close(lc, ld, rtol=1e-5, atol=1e-5)
    for a, b in ((hc, hd), (wc, wd), (bc, bd)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("kind", ["kl_fwd", "kl_rev", "jsd"])
def test_dense_teacher_equals_dense(kind, temperature):
    spec = KDSpec(kind=kind, temperature=temperature, beta=0.5)
    (lc, hc, wc, bc), (ld, hd, wd, bd) = _both(2, "dense", spec, 10)
    torch.testing.assert_close(lc, ld, rtol=1e-5, atol=1e-5)
    for a, b in ((hc, hd), (wc, wd), (bc, bd)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ce_only_and_bf16_inputs():
    (lc, hc, wc, _), (ld, hd, wd, _) = _both(3, None, KDSpec(), 7)
    torch.testing.assert_close(lc, ld, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hc, hd, rtol=1e-4, atol=1e-6)
    (lc, hc, wc, bc), (ld, hd, wd, bd) = _both(4, "topk", KDSpec(kind="kl_rev"), 12, dtype=torch.bfloat16)
    assert hc.dtype == torch.bfloat16 and torch.isfinite(lc)
    torch.testing.assert_close(lc, ld, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hc.float(), hd.float(), rtol=2e-2, atol=1e-3)


def test_fully_masked_gives_zero_and_errors():
    hidden, weight, bias, targets, t_logits, ce_w, kd_w = _inputs(5)
    h = hidden.clone().requires_grad_(True)
    loss, stats = chunked_ce_kd(h, weight, torch.full((N,), IGNORE_INDEX), teacher=_topk(t_logits, 1.0), ce_weights=ce_w,
                                kd_weights=kd_w, chunk_size=8)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(h.grad, torch.zeros_like(h)) and stats.ce_sum == 0.0
    with pytest.raises(ValueError, match="dense teacher only"):
        chunked_ce_kd(hidden, weight, targets, teacher=t_logits, ce_weights=ce_w, spec=KDSpec(kind="tvd"))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_ce_kd(hidden, weight, targets, ce_weights=ce_w, chunk_size=0)


def test_auto_chunk_fits_about_64_mib_of_logits_per_chunk_from_256_up_and_the_config_takes_it():
    from pydantic import ValidationError

    from kdkit.config.schema import ObjectiveConfig
    from kdkit.loss.chunked import CHUNK_BYTES, auto_chunk

    assert [auto_chunk(v) for v in (101, 32000, 49152, 151936, 10**7)] == [1024, 512, 256, 256, 256]
    for v in (16000, 32000, 49152):  # a power of two, the largest that fits (above the floor of 256)
        c = auto_chunk(v)
        assert c & (c - 1) == 0 and c * 4 * v <= CHUNK_BYTES < 2 * c * 4 * v
    assert ObjectiveConfig().chunk_size == "auto" and ObjectiveConfig(chunk_size=0).chunk_size == 0
    with pytest.raises(ValidationError, match="must be >= 0 or 'auto'"):
        ObjectiveConfig(chunk_size=-1)
    with pytest.raises(ValidationError):
        ObjectiveConfig(chunk_size="big")


def test_the_head_gradient_is_handed_over_once_and_scaled_in_place():
    """No second full-size copy of the LM head's gradient: backward scales the computed one in place (by
    the upstream gradient, e.g. a rank count), and a second differentiation is refused."""
    torch.manual_seed(0)
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(40, 8, requires_grad=True)
    y = torch.randint(0, 40, (10,))
    ce_w = torch.full((10,), 0.1)
    loss, _ = chunked_ce_kd(h, w, y, ce_weights=ce_w, chunk_size=3)
    (loss * 3.0).backward(retain_graph=True)
    ref_w = w.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(h.detach() @ ref_w.t(), y) * 3.0
    ref.backward()
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward()


@pytest.mark.parametrize("teacher_kind", [None, "topk"])
def test_a_head_without_bias_equals_dense(teacher_kind):
    hidden, weight, _, targets, t_logits, ce_w, kd_w = _inputs(11, bias=False)
    spec = KDSpec(kind="kl_fwd", temperature=2.0)
    teacher = _topk(t_logits, 2.0) if teacher_kind else None
    got = []
    for fn in ("chunked", "dense"):
        h, w = (x.detach().clone().requires_grad_(True) for x in (hidden, weight))
        if fn == "chunked":
            loss, _ = chunked_ce_kd(h, w, targets, bias=None, teacher=teacher, ce_weights=ce_w, kd_weights=kd_w,
                                    spec=spec, chunk_size=8)
        else:
            loss = _dense(h, w, None, targets, teacher, ce_w, kd_w, spec)
        (loss * 0.6).backward()
        got.append((loss.detach(), h.grad, w.grad))
    (lc, hc, wc), (ld, hd, wd) = got
    torch.testing.assert_close(lc, ld, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hc, hd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wc, wd, rtol=1e-4, atol=1e-6)


def test_another_ignore_index_marks_the_same_positions():
    hidden, weight, b, targets, t_logits, ce_w, kd_w = _inputs(12)
    spec = KDSpec(kind="jsd", beta=0.3)
    teacher = _topk(t_logits, 1.0)
    ref, ref_st = chunked_ce_kd(hidden, weight, targets, bias=b, teacher=teacher, ce_weights=ce_w, kd_weights=kd_w,
                                spec=spec, chunk_size=16)
    other = torch.where(targets == IGNORE_INDEX, torch.full_like(targets, -1), targets)
    got, st = chunked_ce_kd(hidden, weight, other, bias=b, teacher=teacher, ce_weights=ce_w, kd_weights=kd_w,
                            spec=spec, chunk_size=16, ignore_index=-1)
    assert (other == -1).sum() > 0 and float(got) == pytest.approx(float(ref), rel=1e-6)
    assert float(st.ce_sum) == pytest.approx(float(ref_st.ce_sum), rel=1e-6)


def test_token_ce_equals_a_float64_reference_with_any_ignore_index():
    from kdkit.loss.divergences import token_ce

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 7, 31, generator=g, requires_grad=True)
    targets = torch.randint(0, 31, (3, 7), generator=g)
    targets[0, :3] = -7
    got = token_ce(logits, targets, ignore_index=-7)
    lp = torch.log_softmax(logits.double(), -1)
    want = torch.stack([torch.stack([-lp[b, t, targets[b, t]] if targets[b, t] != -7 else lp.new_zeros(())
                                     for t in range(7)]) for b in range(3)])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    (got * 1.3).sum().backward()
    ref = logits.detach().double().requires_grad_(True)
    lp = torch.log_softmax(ref, -1)
    mask = targets != -7
    (-(lp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)) * mask * 1.3).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)
    assert float(got[0, :3].abs().sum()) == 0.0
