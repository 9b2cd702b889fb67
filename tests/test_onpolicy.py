"""On-policy distillation (GKD) and sequence-level KD: the loss on the student's own tokens against a float64
reference, λ = 0 equal to off-policy bitwise, exact resume, and `kdkit generate`'s bytes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config.load import ConfigError, load_train_config
from kdkit.config.schema import ObjectiveConfig, OnPolicyConfig
from kdkit.data import rows as kdata
from kdkit.models.load import load_causal_lm, load_tokenizer
from kdkit.train import onpolicy, train
from kdkit.train.objective import compute_objective
from tests.helpers import kill_then_resume, save_model_dir, toy_rows, write_jsonl
from tests.reference import ref_div, softmax64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy_world")
    save_model_dir(root / "teacher", seed=1, hidden=32)
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(12))
    write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"], "task": r["task"]} for r in toy_rows(5, seed=3)])
    return root


def _cfg(root: Path, tmp: Path, on_policy: dict | None, **objective) -> Path:
    base = {
        "student": {"path": str(root / "student"), "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                            "dropout": 0.1}},
        "teacher": {"model": str(root / "teacher")},
        "data": {"train": str(root / "train.jsonl"), "max_length": 128},
        "objective": {"kd": {"kind": "jsd", "beta": 0.5}, **objective},
        "optim": {"lr": 5e-3, "micro_batch": 2, "grad_accum": 2, "epochs": 2, "schedule": "constant"},
        "checkpoint": {"every": 0},
    }
    if on_policy is not None:
        base["objective"]["on_policy"] = on_policy
    p = tmp / f"cfg-{len(list(tmp.glob('cfg-*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def _run(cfg: Path, out: Path) -> Path:
    train(load_train_config(cfg), out, progress=False, log=lambda m: None)
    return out


def _jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def test_on_policy_steps_are_a_seeded_lambda_share():
    op = OnPolicyConfig(fraction=0.3, seed=7)
    picks = [onpolicy.is_on_policy(op, s) for s in range(4000)]
    assert picks == [onpolicy.is_on_policy(op, s) for s in range(4000)]  # a function of (seed, step) only
    assert abs(sum(picks) / 4000 - 0.3) < 0.03
    assert picks != [onpolicy.is_on_policy(OnPolicyConfig(fraction=0.3, seed=8), s) for s in range(4000)]
    assert not any(onpolicy.is_on_policy(OnPolicyConfig(fraction=0.0), s) for s in range(100))
    assert all(onpolicy.is_on_policy(OnPolicyConfig(fraction=1.0), s) for s in range(100))
    assert not onpolicy.is_on_policy(None, 0)


def test_rollouts_keep_the_prompt_and_make_the_completion_the_only_target(world):
    tok = load_tokenizer(world / "student")
    model = load_causal_lm(world / "student")
    rows, _ = kdata.load_dataset(tok, world / "train.jsonl", max_length=128)
    op = OnPolicyConfig(fraction=1.0, max_new_tokens=9, temperature=1.0)
    gen = onpolicy.rollouts(model, tok, rows[:4], op, seed=5)
    assert gen == onpolicy.rollouts(model, tok, rows[:4], op, seed=5)  # seeded sampling
    assert gen != onpolicy.rollouts(model, tok, rows[:4], op, seed=6)
    for r, g in zip(rows[:4], gen, strict=True):
        p = onpolicy.prompt_ids(r)
        assert p == r.input_ids[:len(p)] and not any(r.loss_mask[:len(p)]) and r.loss_mask[len(p)]
        assert g.input_ids[:len(p)] == p and g.loss_mask == [False] * len(p) + [True] * (len(g.input_ids) - len(p))
        n = len(g.input_ids) - len(p)
        assert 1 <= n <= 9 and (n == 9 or g.input_ids[-1] == tok.eos_token_id)
        assert tok.eos_token_id not in g.input_ids[len(p):-1]
        assert (g.role, g.task, g.weight) == (r.role, r.task, r.weight)
    state = torch.get_rng_state()
    onpolicy.rollouts(model, tok, rows[:2], op, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # sampling leaves the training RNG alone


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_on_policy_loss_is_gkd_generalised_jsd_on_generated_tokens(world, beta, temperature):
    tok = load_tokenizer(world / "student")
    student, teacher = load_causal_lm(world / "student"), load_causal_lm(world / "teacher")
    rows, _ = kdata.load_dataset(tok, world / "train.jsonl", max_length=128)
    gen = onpolicy.rollouts(student, tok, rows[:3], OnPolicyConfig(fraction=1.0, max_new_tokens=7), seed=11)
    batch = kdata.collate(gen, tok.pad_token_id)
    with torch.no_grad():
        s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    cfg = ObjectiveConfig(kd={"kind": "jsd", "beta": beta, "temperature": temperature}, ce_coef=1.0)
    out = compute_objective(s, batch.targets, onpolicy.objective(cfg), teacher=t)
    # GKD (Agarwal et al. 2024, eq. for JSD(β)): mean over generated tokens of
    # β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m), m = β·p_t + (1−β)·p_s, at temperature T, scaled by T²; no CE
    total, n = 0.0, 0
    for b in range(batch.targets.shape[0]):
        for pos in range(batch.targets.shape[1]):
            if batch.targets[b, pos] == kdata.IGNORE_INDEX:
                continue
            p, q = softmax64(t[b, pos] / temperature), softmax64(s[b, pos] / temperature)
            total += float(ref_div(p, q, "jsd", beta, 0.1)) * temperature**2
            n += 1
    assert n == sum(len(g.input_ids) - len(onpolicy.prompt_ids(r)) for g, r in zip(gen, rows[:3], strict=True))
    assert out.floats()["total_loss"] == pytest.approx(total / n, rel=1e-4, abs=1e-6)  # float32 math


def test_lambda_zero_is_the_off_policy_run_bitwise(world, tmp_path):
    off = _run(_cfg(world, tmp_path, None), tmp_path / "off")
    zero = _run(_cfg(world, tmp_path, {"fraction": 0.0}), tmp_path / "zero")
    a, b = _weights(off), _weights(zero)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = _jsonl(off / "metrics.jsonl"), _jsonl(zero / "metrics.jsonl")
    assert [m["total_loss"] for m in ma] == [m["total_loss"] for m in mb]
    assert all(m["on_policy"] == 0.0 for m in mb)


def test_on_policy_run_trains_on_generated_tokens_and_logs_its_steps(world, tmp_path):
    run = _run(_cfg(world, tmp_path, {"fraction": 0.5, "max_new_tokens": 6, "seed": 3}), tmp_path / "half")
    rows = _jsonl(run / "metrics.jsonl")
    op = OnPolicyConfig(fraction=0.5, seed=3)
    assert [m["on_policy"] for m in rows] == [float(onpolicy.is_on_policy(op, s)) for s in range(len(rows))]
    on = [m for m in rows if m["on_policy"]]
    assert on and len(on) < len(rows)
    # CE is off on generated tokens: the step's total is its KD alone, over at most 6 tokens per row
    assert all(m["total_loss"] == pytest.approx(m["kl_loss"], rel=1e-5) for m in on)
    assert all(m["tokens"] <= 4 * 6 for m in on)


def test_kill_9_mid_on_policy_run_then_resume_is_bitwise_equal(world, tmp_path):
    cfg = _cfg(world, tmp_path, {"fraction": 0.5, "max_new_tokens": 5, "temperature": 1.0})
    raw = yaml.safe_load(cfg.read_text())
    raw["checkpoint"] = {"every": 2, "keep": 2}
    cfg.write_text(yaml.safe_dump(raw))
    full = _run(cfg, tmp_path / "full")
    run = tmp_path / "killed"
    kill_then_resume(cfg, run, "after_checkpoint:4")
    a, b = _weights(full), _weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = _jsonl(full / "metrics.jsonl"), _jsonl(run / "metrics.jsonl")
    assert [(m["on_policy"], m["total_loss"], m["tokens"]) for m in ma] == \
           [(m["on_policy"], m["total_loss"], m["tokens"]) for m in mb]
    assert any(m["on_policy"] for m in ma[4:])  # the resumed part has on-policy steps


@pytest.mark.parametrize("change, match", [
    ({"teacher": {"cache": "some/cache"}}, "objective.on_policy: the teacher must score the student's own tokens"),
    ({"objective": {"kd_weight": 0.0}}, "objective.on_policy: objective.kd_weight is 0"),
    ({"objective": {"on_policy": {"temperature": 0.0, "top_p": 0.9}}}, "objective.on_policy.top_p"),
])
def test_on_policy_settings_that_cannot_take_effect_are_refused(world, tmp_path, change, match):
    raw = yaml.safe_load(_cfg(world, tmp_path, {"fraction": 0.5}).read_text())
    for k, v in change.items():
        if k == "teacher":
            raw[k] = v
        else:
            raw[k] = {**raw[k], **v, "on_policy": {**raw[k].get("on_policy", {}), **v.get("on_policy", {})}}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=match):
        load_train_config(p)
    res = CliRunner().invoke(app, ["validate", str(p)], terminal_width=400)
    assert res.exit_code == 2 and match in " ".join(res.output.split())


# --------------------------------------------------------------------------- kdkit generate


def _generate(world: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdkit", "generate", "--model", str(world / "teacher"), "--data",
                           str(world / "prompts.jsonl"), "--out", str(out), "--max-new-tokens", "12",
                           "--batch-size", "2", "--no-progress", *extra], capture_output=True, text=True)


def test_generate_writes_training_rows_with_identical_bytes_twice(world, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _generate(world, a).returncode == 0
    assert _generate(world, b).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    rows = _jsonl(a)
    prompts = _jsonl(world / "prompts.jsonl")
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]
    assert [r["task"] for r in rows] == [p["task"] for p in prompts]
    # greedy: each completion is the teacher's argmax continuation of the prompt
    tok, model = load_tokenizer(world / "teacher"), load_causal_lm(world / "teacher")
    ids = tok(prompts[0]["prompt"])["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=2)
    want = tok.decode([t for t in out[0, len(ids):].tolist() if t != 2], skip_special_tokens=True)
    assert rows[0]["completion"] == want
    # the rows train as they are
    rows_t, _ = kdata.load_dataset(tok, a, max_length=128)
    assert len(rows_t) == len(prompts)


def test_generate_resumes_a_cut_file_to_the_same_bytes_and_refuses_other_inputs(world, tmp_path):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    assert _generate(world, full).returncode == 0
    assert _generate(world, cut).returncode == 0
    data = cut.read_bytes()
    cut.write_bytes(data[: data.index(b"\n", data.index(b"\n", data.index(b"\n") + 1) + 1) + 10])  # 3 rows + a bit
    side = json.loads((tmp_path / "cut.jsonl.kdkit.json").read_text())
    side["complete"] = False
    (tmp_path / "cut.jsonl.kdkit.json").write_text(json.dumps(side))
    proc = _generate(world, cut)
    assert proc.returncode == 0 and "resuming after 2 rows" in proc.stdout, proc.stdout + proc.stderr
    assert cut.read_bytes() == full.read_bytes()
    other = _generate(world, cut, "--max-new-tokens", "5")
    assert other.returncode == 2 and "settings" in other.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.jsonl", "cut.jsonl.kdkit.json", "full.jsonl",
                                                         "full.jsonl.kdkit.json"]  # no lock file left behind
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text("mine\n")
    refused = _generate(world, theirs)
    assert refused.returncode == 2 and "not written by `kdkit generate`" in " ".join(refused.stderr.split())
    assert theirs.read_text() == "mine\n"


def test_generate_refuses_to_resume_across_an_edited_chat_template(world, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(world / "teacher", model)
    out = tmp_path / "rows.jsonl"
    cmd = lambda: subprocess.run([sys.executable, "-m", "kdkit", "generate", "--model", str(model), "--data",  # noqa: E731
                                  str(world / "prompts.jsonl"), "--out", str(out), "--max-new-tokens", "4",
                                  "--no-progress"], capture_output=True, text=True)
    assert cmd().returncode == 0
    before = out.read_bytes()
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    proc = cmd()
    assert proc.returncode == 2 and "model: chat_template.jinja changed" in " ".join(proc.stderr.split())
    assert out.read_bytes() == before


def test_on_policy_with_chat_rows_and_a_padded_teacher(world, tmp_path):
    """A real configuration: messages rows (the prompt is the rendered history and the assistant header) and a
    teacher whose embedding matrix has more rows than the tokenizer."""
    save_model_dir(tmp_path / "padded", seed=1, hidden=32, extra_vocab=27)
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in toy_rows(8)]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    raw = yaml.safe_load(_cfg(world, tmp_path, {"fraction": 1.0, "max_new_tokens": 6}).read_text())
    raw["teacher"] = {"model": str(tmp_path / "padded")}
    raw["data"]["train"] = str(tmp_path / "chat.jsonl")
    p = tmp_path / "chat.yaml"
    p.write_text(yaml.safe_dump(raw))
    run = _run(p, tmp_path / "run")
    steps = _jsonl(run / "metrics.jsonl")
    assert all(m["on_policy"] == 1.0 and 1 <= m["tokens"] <= 4 * 6 for m in steps), steps  # 4 rows a step
    tok = load_tokenizer(world / "student")
    chat, _ = kdata.load_dataset(tok, tmp_path / "chat.jsonl", max_length=128)
    prompt = tok.decode(onpolicy.prompt_ids(chat[0]))
    assert prompt.endswith("assistant:\n") and "return" not in prompt  # the history and the header, no answer


def test_a_second_generate_into_the_same_file_is_refused_while_the_first_writes(world, tmp_path):
    import fcntl

    out = tmp_path / "rows.jsonl"
    with (tmp_path / ".rows.jsonl.kdkit-lock").open("a") as fh:  # as a first `kdkit generate` holds it
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = _generate(world, out)
    assert busy.returncode == 2 and "another `kdkit generate` is writing it" in " ".join(busy.stderr.split())
    assert not out.exists()
    assert _generate(world, out).returncode == 0  # once it is released


def test_a_padded_head_never_samples_an_id_the_tokenizer_does_not_have(tmp_path):
    from kdkit.evaluate.coherence import coherence
    from kdkit.models.generation import GenerationSettings, generate_ids

    save_model_dir(tmp_path / "padded", seed=3, hidden=32, extra_vocab=27)
    tok, model = load_tokenizer(tmp_path / "padded"), load_causal_lm(tmp_path / "padded")
    real = len(tok)

    class Boost(torch.nn.Module):  # the padded rows would win every draw and every argmax
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, x):
            y = self.head(x)
            return torch.cat([y[..., :real], y[..., real:] + 1000.0], dim=-1)

    model.lm_head = Boost(model.lm_head)
    prompts = [tok("def f(x):\n")["input_ids"], tok("abc")["input_ids"]]
    for settings in (GenerationSettings(max_new_tokens=8), GenerationSettings(max_new_tokens=8, do_sample=True)):
        outs = generate_ids(model, tok, prompts, settings)
        assert all(0 <= t < real for row in outs for t in row) and all(len(row) > 0 for row in outs), outs
    assert coherence("") == 0.0 and coherence("   \n") == 0.0 and coherence("ok") == 1.0


def test_on_policy_with_a_padded_head_student_and_an_exact_teacher_trains(world, tmp_path):
    """The student's head has 27 padded rows, the teacher exactly the tokenizer's: a rollout id past the
    tokenizer would index past the teacher's embedding (it crashed). The padded rows are made to win."""
    save_model_dir(tmp_path / "padded_student", seed=2, hidden=16, extra_vocab=27)
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp_path / "padded_student" / "model.safetensors"))
    real = len(load_tokenizer(tmp_path / "padded_student"))
    w["lm_head.weight"][real:] = 50.0 * w["lm_head.weight"][:real].abs().mean()  # large logits on padded rows
    save_file(w, str(tmp_path / "padded_student" / "model.safetensors"), metadata={"format": "pt"})
    raw = yaml.safe_load(_cfg(world, tmp_path, {"fraction": 1.0, "max_new_tokens": 6}).read_text())
    raw["student"]["path"] = str(tmp_path / "padded_student")
    p = tmp_path / "padded.yaml"
    p.write_text(yaml.safe_dump(raw))
    runner = __import__("typer.testing", fromlist=["CliRunner"]).CliRunner()
    from kdkit.cli import app

    assert runner.invoke(app, ["validate", str(p)]).exit_code == 0
    run = _run(p, tmp_path / "run")
    steps = _jsonl(run / "metrics.jsonl")
    assert all(m["on_policy"] == 1.0 and m["tokens"] >= 1 for m in steps) and all(
        math.isfinite(m["total_loss"]) for m in steps)


def _sampled_reference(logits: torch.Tensor, targets: torch.Tensor, lp_t: torch.Tensor):
    """float64: d = log p_s(x) − log p_t(x) and its score-function gradient d · (onehot(x) − p_s) per position."""
    lp_s = torch.log_softmax(logits.double(), -1)
    valid = targets != -100
    safe = targets.clamp(min=0)
    d = lp_s.gather(-1, safe[..., None]).squeeze(-1) - lp_t.double()
    d = torch.where(valid, d, torch.zeros_like(d))
    onehot = torch.nn.functional.one_hot(safe, logits.shape[-1]).double()
    grad = d[..., None] * (onehot - lp_s.exp()) * valid[..., None]
    return d, grad


def test_sampled_kl_rev_is_its_float64_reference_value_and_gradient():
    from kdkit.loss.divergences import SampledTokens, sampled_kl_rev

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 11, generator=g) * 3).requires_grad_(True)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, :2] = -100
    lp_t = torch.log_softmax(torch.randn(2, 5, 11, generator=g), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    out = sampled_kl_rev(logits, SampledTokens(targets, lp_t))
    out.sum().backward()
    d, grad = _sampled_reference(logits.detach(), targets, lp_t)
    torch.testing.assert_close(out.detach().double(), d, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.grad.double(), grad, atol=1e-5, rtol=0)
    assert torch.all(out[0, :2] == 0) and torch.all(logits.grad[0, :2] == 0)


def test_sampled_kl_rev_gradient_in_expectation_is_the_full_vocabulary_reverse_kl_gradient():
    """Σ_x p_s(x) · ∇(sampled estimate at x) = ∇ KL(p_s ‖ p_t): the estimator is unbiased (exact enumeration)."""
    from kdkit.loss.divergences import SampledTokens, sampled_kl_rev, token_divergence

    g = torch.Generator().manual_seed(1)
    v = 9
    logits, t_logits = torch.randn(v, generator=g, dtype=torch.float64), torch.randn(v, generator=g) * 2
    lp_t = torch.log_softmax(t_logits.double(), -1)
    p_s = torch.softmax(logits, -1)
    expected = torch.zeros(v, dtype=torch.float64)
    for x in range(v):
        s = logits.float().clone().requires_grad_(True)
        sampled_kl_rev(s[None, None], SampledTokens(torch.tensor([[x]]), lp_t[x].float()[None, None])).sum().backward()
        expected += p_s[x] * s.grad.double()
    s = logits.float().clone().requires_grad_(True)
    token_divergence(s[None], t_logits[None], "kl_rev", t2_scale=False).sum().backward()
    torch.testing.assert_close(expected, s.grad.double(), atol=1e-5, rtol=0)


def test_sampled_kl_rev_run_trains_on_the_students_samples(world, tmp_path):
    """objective.on_policy.loss: sampled_kl_rev — the step's loss is the mean d = log p_s − log p_t over the
    sampled tokens, which the live teacher scores at those tokens alone."""
    op = {"fraction": 1.0, "max_new_tokens": 6, "seed": 3, "loss": "sampled_kl_rev"}
    with pytest.raises(ConfigError, match="objective.kd.beta: every step is on-policy with on_policy.loss "
                                          "sampled_kl_rev"):  # the divergence settings would do nothing
        load_train_config(_cfg(world, tmp_path, op))
    cfg = _cfg(world, tmp_path, op, kd={})
    rows = _jsonl(_run(cfg, tmp_path / "sampled") / "metrics.jsonl")
    assert rows and all(m["on_policy"] == 1.0 for m in rows)
    assert all(m["total_loss"] == pytest.approx(m["kl_loss"], rel=1e-5) for m in rows)
    assert all(math.isfinite(m["kl_loss"]) and "top1_agree" not in m for m in rows)
