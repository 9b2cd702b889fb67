"""kdkit.train.objective: composition, roles, task weights, barrier and step normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kdkit.config.schema import BarrierConfig, DivergenceConfig, ObjectiveConfig, RoleTerms
from kdkit.loss.divergences import TopK, aggregate, token_divergence
from kdkit.train.objective import IGNORE_INDEX, StepDenominator, compute_objective, step_denominator

B, T, V = 4, 9, 23


def _batch(seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g)
    t = torch.randn(B, T, V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    y[torch.rand(B, T, generator=g) < ignore_frac] = IGNORE_INDEX
    return s, t, y


def _ref_ce(s, y):
    valid = y != IGNORE_INDEX
    lp = torch.log_softmax(s.double(), -1)
    nll = -lp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return nll, valid


def test_total_is_ce_plus_weighted_kd_over_valid_tokens():
    s, t, y = _batch()
    cfg = ObjectiveConfig(ce_coef=0.7, kd_weight=0.3, kd=DivergenceConfig(kind="kl_fwd", temperature=2.0))
    out = compute_objective(s, y, cfg, teacher=t)
    nll, valid = _ref_ce(s, y)
    kd = token_divergence(s, t, "kl_fwd", temperature=2.0).double()
    n = valid.sum()
    expected = (0.7 * nll[valid].sum() + 0.3 * kd[valid].sum()) / n
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    assert out.floats()["ce_loss"] == pytest.approx(float(nll[valid].mean()), rel=1e-5)
    assert out.floats()["kl_loss"] == pytest.approx(float(kd[valid].mean()), rel=1e-5)
    assert out.floats()["top1_agree"] == pytest.approx(float((s.argmax(-1) == t.argmax(-1))[valid].float().mean()))


def test_ce_coef_zero_is_pure_kd_and_gradients_match():
    s, t, y = _batch(1)
    cfg = ObjectiveConfig(ce_coef=0.0, kd_weight=1.0, kd=DivergenceConfig(kind="jsd", beta=0.3))
    x = s.clone().requires_grad_(True)
    compute_objective(x, y, cfg, teacher=t).loss.backward()
    x2 = s.clone().requires_grad_(True)
    valid = y != IGNORE_INDEX
    aggregate(token_divergence(x2, t, "jsd", beta=0.3), valid, "mean").backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_kd_only_on_configured_roles():
    s, t, y = _batch(2, ignore_frac=0.0)
    cfg = ObjectiveConfig(ce_coef=0.0, kd_weight=1.0, roles={"new": RoleTerms(kd=False), "anchor": RoleTerms()})
    roles = ["anchor", "new", "anchor", "new"]
    x = s.clone().requires_grad_(True)
    out = compute_objective(x, y, cfg, teacher=t, roles=roles)
    out.loss.backward()
    assert torch.equal(x.grad[1], torch.zeros(T, V)) and torch.equal(x.grad[3], torch.zeros(T, V))
    assert x.grad[0].abs().sum() > 0 and x.grad[2].abs().sum() > 0
    kd = token_divergence(s, t, "kl_fwd")
    assert out.floats()["kl_loss"] == pytest.approx(float(kd[[0, 2]].mean()), rel=1e-5)
    assert out.floats()["kd_tokens"] == 2 * T


def test_task_multiplier_scales_that_rows_gradient_exactly():
    s, t, y = _batch(3)
    base = ObjectiveConfig(ce_coef=0.0, kd_weight=0.5)
    heavy = ObjectiveConfig(ce_coef=0.0, kd_weight=0.5, task_weights={"HE/34": 4.0})
    tasks = ["MBPP/1", "HE/34", "MBPP/2", "MBPP/3"]
    grads = []
    for cfg in (base, heavy):
        x = s.clone().requires_grad_(True)
        compute_objective(x, y, cfg, teacher=t, tasks=tasks).loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1][1], 4.0 * grads[0][1])
    for r in (0, 2, 3):
        torch.testing.assert_close(grads[1][r], grads[0][r])


def test_row_weight_scales_ce_and_kd():
    s, t, y = _batch(4)
    cfg = ObjectiveConfig(ce_coef=1.0, kd_weight=1.0)
    w = torch.tensor([1.0, 2.0, 0.0, 1.0])
    x = s.clone().requires_grad_(True)
    compute_objective(x, y, cfg, teacher=t, row_weights=w).loss.backward()
    x2 = s.clone().requires_grad_(True)
    compute_objective(x2, y, cfg, teacher=t).loss.backward()
    torch.testing.assert_close(x.grad[1], 2 * x2.grad[1])
    assert torch.equal(x.grad[2], torch.zeros(T, V))


def test_sqrt_row_ce_norm():
    s, _, y = _batch(5)
    cfg = ObjectiveConfig(ce_norm="sqrt_row", kd_weight=0.0)
    out = compute_objective(s, y, cfg)
    nll, valid = _ref_ce(s, y)
    num = den = 0.0
    for r in range(B):
        n_r = int(valid[r].sum())
        if n_r:
            num += float(nll[r][valid[r]].sum()) / math.sqrt(n_r)
            den += n_r / math.sqrt(n_r)
    assert float(out.loss) == pytest.approx(num / den, rel=1e-5)


def test_accumulation_equals_one_big_batch():
    """Batch 4 in one call == the same rows in 2 micro-batches with the step denominator."""
    s, t, y = _batch(6)
    cfg = ObjectiveConfig(ce_coef=1.0, kd_weight=0.5, ce_norm="sqrt_row")
    x = s.clone().requires_grad_(True)
    full = compute_objective(x, y, cfg, teacher=t).loss
    full.backward()
    x2 = s.clone().requires_grad_(True)
    denom = step_denominator([y[:2], y[2:]], cfg)
    parts = [compute_objective(x2[i:i + 2], y[i:i + 2], cfg, teacher=t[i:i + 2], denom=denom).loss for i in (0, 2)]
    sum(parts).backward()
    assert float(sum(parts)) == pytest.approx(float(full), rel=1e-6)
    torch.testing.assert_close(x2.grad, x.grad)


def test_topk_teacher_reports_tail_mass():
    s, t, y = _batch(7, ignore_frac=0.0)
    lp = torch.log_softmax(t, -1)
    vals, ids = lp.topk(5, -1)
    out = compute_objective(s, y, ObjectiveConfig(), teacher=TopK(ids, vals))
    assert out.floats()["tail_mass"] == pytest.approx(float((1 - vals.exp().sum(-1)).mean()), rel=1e-4)


def test_barrier_is_zero_below_tau_and_active_above():
    s, t, y = _batch(8)
    valid = y != IGNORE_INDEX
    agg = float(aggregate(token_divergence(s, t, "kl_rev", t2_scale=False), valid, "rmse"))
    for tau, active in ((agg + 0.1, False), (agg - 0.1, True)):
        cfg = ObjectiveConfig(ce_coef=1.0, kd_weight=0.0,
                              barrier=BarrierConfig(kind="kl_rev", aggregate="rmse", tau=tau, weight=2.0))
        x = s.clone().requires_grad_(True)
        out = compute_objective(x, y, cfg, reference=t)
        ce_only = compute_objective(s, y, ObjectiveConfig(kd_weight=0.0)).loss
        assert out.floats()["barrier_agg"] == pytest.approx(agg, rel=1e-5)
        expected = 2.0 * max(agg - tau, 0.0)
        assert out.floats()["barrier"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert float(out.loss) == pytest.approx(float(ce_only) + expected, rel=1e-5)
        assert active == (out.floats()["barrier"] > 0)


def test_fully_masked_batch_gives_zero_loss_and_zero_gradient():
    s, t, _ = _batch(9)
    y = torch.full((B, T), IGNORE_INDEX)
    cfg = ObjectiveConfig(barrier=BarrierConfig(aggregate="rmse"))
    x = s.clone().requires_grad_(True)
    out = compute_objective(x, y, cfg, teacher=t, reference=t)
    out.loss.backward()
    assert float(out.loss) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_bf16_logits_give_finite_loss():
    s, t, y = _batch(10)
    out = compute_objective(s.bfloat16(), y, ObjectiveConfig(), teacher=t.bfloat16())
    assert math.isfinite(float(out.loss)) and out.loss.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kd": {"kind": "kl"}}, "kd.kind"),
        ({"kd": {"kind": "jsd", "beta": 1.2}}, "kd.beta"),
        ({"kd": {"alpha": 1.0}}, "kd.alpha"),
        ({"kd": {"temperature": 0.0}}, "kd.temperature"),
        ({"kd": {"tail": "drop"}}, "kd.tail"),
        ({"barrier": {"aggregate": "median"}}, "barrier.aggregate"),
        ({"ce_norm": "row"}, "ce_norm"),
        ({"kd_wieght": 0.1}, "kd_wieght"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValidationError) as e:
        ObjectiveConfig(**kwargs)
    locs = [".".join(str(p) for p in err["loc"]) for err in e.value.errors()]
    assert field in locs


def test_runtime_errors():
    s, t, y = _batch(11)
    with pytest.raises(ValueError, match="barrier is set but no reference"):
        compute_objective(s, y, ObjectiveConfig(barrier=BarrierConfig()), teacher=t)
    with pytest.raises(ValueError, match="targets shape"):
        compute_objective(s, y[:, :-1], ObjectiveConfig())
    with pytest.raises(ValueError, match="roles: got 3 entries"):
        compute_objective(s, y, ObjectiveConfig(), roles=["a", "b", "c"])
    with pytest.raises(ValueError, match="target ids out of range"):
        compute_objective(s, torch.full((B, T), V), ObjectiveConfig())
    with pytest.raises(ValueError, match="must be >= 0"):
        StepDenominator(-1.0)


@pytest.mark.parametrize("weights", [(1.0, 2.0, 0.5, 1.0), (0.0, 2.0, 0.5, 1.0), (0.0, 0.0, 0.25, 0.0)])
@pytest.mark.parametrize("task_b", [3.0, 0.0])
@pytest.mark.parametrize("teacher_kind", ["topk", "dense", None])
def test_chunked_objective_equals_dense_objective(teacher_kind, task_b, weights):
    from kdkit.train.objective import compute_objective_chunked

    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(B, T, 16, generator=g)
    head_w = torch.randn(V, 16, generator=g) * 0.5
    _, t, y = _batch(12)
    teacher = None
    if teacher_kind == "topk":
        vals, ids = torch.log_softmax(t, -1).topk(6, -1)
        teacher = TopK(ids, vals)
    elif teacher_kind == "dense":
        teacher = t
    cfg = ObjectiveConfig(ce_coef=0.8, kd_weight=0.6, ce_norm="sqrt_row", chunk_size=5, task_weights={"b": task_b},
                          roles={"new": RoleTerms(kd=False)}, kd=DivergenceConfig(kind="kl_rev", temperature=2.0))
    kw = {"roles": ["anchor", "new", "anchor", "anchor"], "tasks": ["a", "b", "b", "c"],
          "row_weights": torch.tensor(weights), "denom": StepDenominator(31.0)}
    h1, w1 = hidden.clone().requires_grad_(True), head_w.clone().requires_grad_(True)
    dense = compute_objective(h1 @ w1.t(), y, cfg, teacher=teacher, **kw)
    dense.loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), head_w.clone().requires_grad_(True)
    chunk = compute_objective_chunked(h2, w2, y, cfg, teacher=teacher, **kw)
    chunk.loss.backward()
    assert float(chunk.loss) == pytest.approx(float(dense.loss), rel=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)
    assert set(chunk.metrics) == set(dense.metrics)
    for out in (dense, chunk):  # the metrics stay on the loss's device: a training step reads them once
        assert all(torch.is_tensor(v) and v.dim() == 0 and v.device == out.loss.device for v in out.metrics.values())
    for key in ("ce_loss", "kl_loss", "top1_agree", "tail_mass", "tokens", "kd_tokens"):
        if key in dense.metrics:
            assert chunk.floats()[key] == pytest.approx(dense.floats()[key], rel=1e-5), key
    if teacher is not None:  # KD statistics are over the KD positions whatever their weight: a float64 reference
        kd_rows = torch.tensor([r != "new" for r in kw["roles"]])
        mask = (y != -100) & kd_rows[:, None]
        s_lp = torch.log_softmax(hidden.double() @ head_w.double().t() / 2.0, -1)
        if teacher_kind == "dense":
            t_lp = torch.log_softmax(t.double() / 2.0, -1)
            ref = 4.0 * (s_lp.exp() * (s_lp - t_lp)).sum(-1)
            assert dense.floats()["kl_loss"] == pytest.approx(float(ref[mask].mean()), rel=1e-4)
        agree = (hidden @ head_w.t()).argmax(-1) == (t.argmax(-1) if teacher_kind == "dense" else teacher.ids[..., 0])
        assert dense.floats()["top1_agree"] == pytest.approx(float(agree[mask].float().mean()), rel=1e-6)


@pytest.mark.parametrize("extra_vocab", [0, 27])
def test_a_live_teacher_at_the_target_positions_equals_its_full_logits_there(tmp_path, extra_vocab):
    """What the chunked loss asks a live teacher for: its LM head on the target positions alone, padded
    rows (of the batch and of the embedding matrix) included; and the same KD value through the loss."""
    from kdkit.data import rows as kdata
    from kdkit.models.load import load_causal_lm, load_tokenizer
    from kdkit.teacher.signals import LiveSignal
    from kdkit.train.objective import compute_objective_chunked
    from tests.helpers import save_model_dir, toy_rows, write_jsonl

    model_dir = save_model_dir(tmp_path / "t", seed=3, extra_vocab=extra_vocab)
    write_jsonl(tmp_path / "d.jsonl", toy_rows(5))
    tok = load_tokenizer(model_dir)
    rows, _ = kdata.load_dataset(tok, tmp_path / "d.jsonl", max_length=64)
    batch = kdata.collate(rows, 0, list(range(len(rows))))
    sig = LiveSignal(load_causal_lm(model_dir).eval(), len(tok))
    full, part = sig(batch, None), sig(batch, None, at_targets=True)
    sel = batch.targets != IGNORE_INDEX
    assert part.shape == (int(sel.sum()), len(tok))
    torch.testing.assert_close(part, full[sel], rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    hidden, head = torch.randn(*batch.targets.shape, 8), torch.randn(len(tok), 8)
    cfg = ObjectiveConfig(kd_weight=1.0, chunk_size=16)
    a = compute_objective_chunked(hidden, head, batch.targets, cfg, teacher=full)
    b = compute_objective_chunked(hidden, head, batch.targets, cfg, teacher=part, teacher_at_targets=True)
    assert float(b.loss) == pytest.approx(float(a.loss), rel=1e-5)
    with pytest.raises(ValueError, match="target positions"):
        compute_objective_chunked(hidden, head, batch.targets, cfg, teacher=part[1:], teacher_at_targets=True)


def test_several_teachers_route_each_rows_kd_to_its_own_teacher():
    """The routed KD equals KD against one teacher whose rows are each row's own teacher's; the sums are
    also kept per teacher (kl_loss@name = that teacher's rows' mean)."""
    from kdkit.config.schema import ObjectiveConfig
    from kdkit.train.objective import compute_objective

    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 6, 13, generator=g, requires_grad=True)
    t_default, t_b = torch.randn(4, 6, 13, generator=g), torch.randn(4, 6, 13, generator=g)
    targets = torch.randint(0, 13, (4, 6), generator=g)
    targets[1, :3] = -100
    row_teachers = ["", "b", "b", ""]
    cfg = ObjectiveConfig(kd_weight=1.0, kd={"kind": "kl_fwd"})
    routed = compute_objective(student, targets, cfg, teacher=t_default, teachers={"b": t_b},
                               row_teachers=row_teachers)
    is_b = torch.tensor([r == "b" for r in row_teachers])[:, None, None]
    merged = compute_objective(student, targets, cfg, teacher=torch.where(is_b, t_b, t_default))
    torch.testing.assert_close(routed.loss, merged.loss, atol=1e-6, rtol=0)
    g_routed, = torch.autograd.grad(routed.loss, student)
    g_merged, = torch.autograd.grad(merged.loss, student)
    torch.testing.assert_close(g_routed, g_merged, atol=1e-6, rtol=0)
    m = routed.floats()
    for name, rows, t in (("teacher", [0, 3], t_default), ("b", [1, 2], t_b)):
        alone = compute_objective(student[rows], targets[rows], cfg, teacher=t[rows]).floats()
        assert m[f"kl_loss@{name}"] == pytest.approx(alone["kl_loss"], rel=1e-5)
    assert m["kl_loss"] == pytest.approx(merged.floats()["kl_loss"], rel=1e-5)


def test_the_barriers_divergence_is_logged_by_every_aggregate_before_the_hinge():
    """barrier_div_{mean,rmse,p95,max}: the per-position KL(student ‖ reference) over the barrier's positions,
    aggregated each way, against float64 — also when the hinge is inert (τ above the aggregate)."""
    g = torch.Generator().manual_seed(5)
    student, ref = torch.randn(3, 7, 11, generator=g), torch.randn(3, 7, 11, generator=g)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[2, 4:] = IGNORE_INDEX
    cfg = ObjectiveConfig(barrier=BarrierConfig(kind="kl_rev", aggregate="rmse", tau=100.0, weight=1.0))
    m = compute_objective(student, targets, cfg, reference=ref).floats()
    ls, lr = torch.log_softmax(student.double(), -1), torch.log_softmax(ref.double(), -1)
    div = (ls.exp() * (ls - lr)).sum(-1)[targets != IGNORE_INDEX]
    want = {"mean": div.mean(), "rmse": torch.sqrt((div ** 2).mean() + 1e-8), "max": div.max(),
            "p95": torch.quantile(div, 0.95)}
    for how, value in want.items():
        assert m[f"barrier_div_{how}"] == pytest.approx(float(value), rel=1e-5), how
    assert m["barrier"] == 0.0  # τ = 100: the hinge is inert, the divergence is still seen
