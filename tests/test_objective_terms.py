"""The run's objective: its terms chosen once from the config, what they need asked of the student and the
sources, a new term joining a run without a change to the step, and each source opened once per run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from kdkit.config.load import ConfigError, load_train_config
from kdkit.config.schema import HiddenConfig, ObjectiveConfig
from kdkit.teacher import signals
from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
from kdkit.train.hidden import HiddenDistill
from kdkit.train.objective import (
    CE,
    KD,
    Barrier,
    FusedCEKD,
    Hidden,
    Inputs,
    Needs,
    Objective,
    StepDenominator,
    Term,
    step_denominator,
)
from tests.helpers import save_model_dir, toy_rows, write_config, write_jsonl


def test_each_configuration_gets_its_terms_and_needs_once():
    kd = ObjectiveConfig(kd_weight=1.0)
    chunked = Objective.for_run(kd, chunked=True, hidden=None)
    assert chunked.terms == (FusedCEKD(at_targets=True),) and chunked.chunked
    assert chunked.needs == Needs(head=True, teacher_at_targets=True)
    barrier = ObjectiveConfig(kd_weight=0.5, barrier={"weight": 1.0, "tau": 0.1})
    dense = Objective.for_run(barrier, chunked=False, hidden=None)
    assert dense.terms == (CE(), KD(), Barrier()) and dense.needs == Needs(logits=True)
    proj = HiddenDistill(HiddenConfig(layers={1: 2, 2: 3}), 8, 12)
    with_hidden = Objective.for_run(ObjectiveConfig(hidden={"layers": {1: 2, 2: 3}}), chunked=True, hidden=proj)
    # the teacher's hidden states come from its whole forward: it is not asked at the targets alone
    assert with_hidden.terms == (FusedCEKD(at_targets=False), Hidden(proj))
    assert with_hidden.needs == Needs(head=True, states=True, teacher_layers=(2, 3))
    sampled = Objective.for_run(kd, chunked=True, hidden=None, sampled=True)  # per-token log-probs: dense
    assert sampled.terms == (CE(), KD(sampled=True)) and sampled.needs == Needs(logits=True, sampled=True)
    assert Objective.for_run(ObjectiveConfig(kd_weight=0.0), chunked=False, hidden=None).terms == (CE(),)
    with pytest.raises(ValueError, match="chunked path has no barrier"):
        Objective.build(barrier, chunked=True)


def test_hidden_states_with_the_sampled_token_loss_are_refused(tmp_path):
    body = {"student": {"path": "s"}, "teacher": {"model": "t"}, "data": {"train": "x.jsonl"},
            "objective": {"hidden": {"layers": {1: 1}}, "on_policy": {"fraction": 0.5, "loss": "sampled_kl_rev"}}}
    with pytest.raises(ConfigError, match="sampled_kl_rev: a sampled step asks the teacher"):
        load_train_config(write_config(tmp_path, body))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("terms_world")
    save_model_dir(root / "teacher", seed=1, hidden=32)
    save_model_dir(root / "student", seed=2, hidden=16)
    write_jsonl(root / "train.jsonl", toy_rows(8))
    write_jsonl(root / "val.jsonl", toy_rows(4, seed=9))
    for name, data in (("cache", "train.jsonl"), ("val_cache", "val.jsonl")):
        precompute(root / "teacher", root / data, root / name, PrecomputeSettings(top_k=16), progress=False,
                   log=lambda m: None)
    return root


def _cfg(root: Path, tmp: Path, **objective) -> Path:
    return write_config(tmp, {
        "student": {"path": str(root / "student")},
        "teacher": {"cache": str(root / "cache"), "validation_cache": str(root / "val_cache")},
        "reference": {"kind": "model", "path": str(root / "student")},
        "data": {"train": str(root / "train.jsonl"), "validation": str(root / "val.jsonl"), "max_length": 96},
        "objective": {"kd_weight": 1.0, "barrier": {"weight": 1.0, "tau": 0.0}, **objective},
        "optim": {"lr": 1e-3, "micro_batch": 4, "max_steps": 1, "schedule": "constant"},
        "checkpoint": {"every": 0}})


def _built(cfg_path: Path, run: Path):
    from kdkit.train.build import build
    from kdkit.train.loop import accelerator

    cfg = load_train_config(cfg_path)
    run.mkdir()
    return build(cfg, run, accelerator(cfg, run), None, lambda m: None)[0]


def test_a_run_opens_each_source_once(world, tmp_path, monkeypatch):
    opened, loaded = [], []
    open_cache, load_model = signals.CachedSignal.open.__func__, signals.load_causal_lm

    def counting_open(cls, path, *args, **kw):
        opened.append(Path(path).name)
        return open_cache(cls, path, *args, **kw)

    def counting_load(path, *args, **kw):
        loaded.append(Path(path).name)
        return load_model(path, *args, **kw)

    monkeypatch.setattr(signals.CachedSignal, "open", classmethod(counting_open))
    monkeypatch.setattr(signals, "load_causal_lm", counting_load)
    r = _built(_cfg(world, tmp_path), tmp_path / "run")
    assert sorted(opened) == ["cache", "val_cache"]  # checked by preflight, then used: never opened again
    assert loaded == ["student"]  # the reference model's weights, read once
    assert isinstance(r.src.teacher, signals.CachedSignal) and isinstance(r.src.reference, signals.LiveSignal)
    assert not r.src.pending


@dataclass(frozen=True)
class StateNorm:
    """A term a user might add: weight · Σ_tok ‖h_last(tok)‖² ÷ the step's denominator, over the targets."""

    weight: float = 0.01
    needs: Needs = Needs(logits=True, states=True)

    def __call__(self, x: Inputs, co, cfg) -> list[Term]:
        h = x.states[-1][:, :-1].float()
        per_tok = (h * h).sum(-1) * co.valid
        return [Term("state_norm", self.weight * per_tok.sum() * co.inv, {"state_norm": per_tok.sum().detach()})]


def test_a_new_term_joins_a_run_without_a_change_to_the_step(world, tmp_path):
    from kdkit.train.plan import plan_step
    from kdkit.train.step import forward_loss, optimizer_step

    r = _built(_cfg(world, tmp_path), tmp_path / "run")
    assert r.objective.terms == (CE(), KD(), Barrier())
    mine = replace(r, objective=Objective(r.objective.cfg, (*r.objective.terms, StateNorm())))
    batch = plan_step(r, 0)[0][0]
    denom = StepDenominator(step_denominator([batch.targets], r.cfg.objective).tokens)
    with torch.no_grad():
        base = forward_loss(r, r.model, batch, r.objective, denom)
        out = forward_loss(mine, r.model, batch, mine.objective, denom)
        states = r.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         output_hidden_states=True).hidden_states[-1][:, :-1].double()
    ref = 0.01 * sum(float(states[b, t] @ states[b, t]) for b in range(states.shape[0])
                     for t in range(states.shape[1]) if batch.targets[b, t] != -100) / denom.tokens
    assert set(out.terms) == {"ce", "kd", "barrier", "state_norm"}
    assert float(out.terms["state_norm"]) == pytest.approx(ref, rel=1e-5)
    assert float(out.loss) == pytest.approx(float(base.loss) + ref, rel=1e-5)
    sums, _ = optimizer_step(mine, 0, [batch], False, [], None)  # and a whole step takes it
    assert sums.v["state_norm"] > 0 and sums.v["kd_tok"] > 0
