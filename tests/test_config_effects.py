"""Every field of the training config changes what a run produces, or is refused where it cannot.

The table below has one entry per field (a new field without an entry fails the first test). Each
entry names a context (overrides of a small base config) and another value for the field; both runs
are made and their signatures compared: final weights, metrics (timings removed), epoch rows, run.json
and the files written — or the error when the run is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import BaseModel

from kdkit.config.load import load_train_config
from kdkit.config.schema import TrainConfig
from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute
from kdkit.train import train
from kdkit.util.errors import KdkitError
from tests.helpers import save_model_dir, toy_rows, write_jsonl

LIVE = {"teacher": {"cache": None, "model": "@teacher"}}
BARRIER = {"reference": {"kind": "base"},
           "objective": {"barrier": {"kind": "kl_rev", "aggregate": "mean", "tau": 0.0, "weight": 2.0}}}
ROLES = {"objective": {"roles": {"anchor": {"ce": True, "kd": True, "barrier": True}}}}
CUDA = torch.cuda.is_available()
PROBES = {"probes": {"prompts": "@probes", "every": 1, "max_new_tokens": 6}}
# the random student loops ("On0474747…") within 24 tokens: below a floor of 0.9 from step 0
FLOOR = {"probes": {**PROBES["probes"], "max_new_tokens": 24}, "early_stop": {"coherence_floor": 0.9, "patience": 1}}
HIDDEN = {**LIVE, "objective": {"hidden": {"layers": {1: 2}, "loss": "cosine", "weight": 1.0}}}
ROUTING = {**LIVE, "routing": {"pairs": "@pairs", "target_modules": ["v_proj"], "refresh_every": 2}}
RANDOM = {**LIVE, "routing": {"pairs": "@pairs", "target_modules": ["v_proj"], "control": "random"}}
TEACHERS = {"data": {"train": "@routed"}, "teachers": {"b": {"model": "@teacher"}}}  # odd rows name teacher 'b'
ON_POLICY = {**LIVE, "objective": {"on_policy": {"fraction": 1.0, "max_new_tokens": 4, "temperature": 1.0}}}

def _merge_ctx(a: dict, b: dict) -> dict:
    return {**a, **b}


# field -> (context overrides, the field's other value)
EFFECTS: dict[str, tuple[dict, typing.Any]] = {
    "student.path": ({}, "@student2"),
    "student.dtype": ({}, "bfloat16"),
    "student.lora.r": ({}, 8),
    "student.lora.alpha": ({}, 4),
    "student.lora.dropout": ({}, 0.3),
    "student.lora.target_modules": ({}, ["q_proj"]),
    "student.load_in": ({}, "4bit"),  # refused without a CUDA GPU
    "teacher.cache": ({}, "@cache16"),
    "teacher.validation_cache": ({"data": {"validation": "@val"}}, "@valcache"),  # epochs gain val_kl, val_top1
    "teacher.model": (LIVE, "@student2"),
    "teacher.dtype": (LIVE, "bfloat16"),
    "teacher.load_in": (LIVE, "8bit"),  # refused without a CUDA GPU
    # a served teacher: its own tests start a vLLM server (tests/test_served.py); here the cache teacher
    # refuses them, naming the field
    "teacher.url": ({}, "http://127.0.0.1:9"),
    "teacher.served_model": ({}, "other"),
    "teacher.top_k": ({}, 8),
    "teacher.timeout_s": ({}, 5.0),
    "teacher.retries": ({}, 0),
    "teachers.model": (TEACHERS, "@student2"),
    "teachers.dtype": (TEACHERS, "bfloat16"),
    "teachers.cache": (TEACHERS, "@cache"),  # beside teachers.b.model: refused (one of cache, model, url)
    "teachers.load_in": (TEACHERS, "8bit"),  # refused without a CUDA GPU
    "teachers.url": (TEACHERS, "http://127.0.0.1:9"),  # nothing answers there: refused
    "teachers.served_model": (TEACHERS, "other"),  # not served: refused naming the field
    "teachers.top_k": (TEACHERS, 8),
    "teachers.timeout_s": (TEACHERS, 5.0),
    "teachers.retries": (TEACHERS, 0),
    "teachers.validation_cache": (TEACHERS, "@valcache"),  # refused: validation is the default teacher's
    "reference.kind": (BARRIER, "cache"),
    "reference.path": ({**BARRIER, "reference": {"kind": "model", "path": "@student"}}, "@student2"),
    "data.train": (LIVE, "@train2"),  # a cache belongs to its data: another file is refused, live it trains
    "data.validation": ({}, "@val"),
    "data.max_length": (LIVE, 16),
    "data.shuffle_seed": ({}, 1),
    "data.on_empty": ({"data": {"train": "@with_empty"}}, "error"),
    "data.truncation": (_merge_ctx(LIVE, {"data": {"max_length": 16}}), "right"),
    "objective.ce_coef": ({}, 0.5),
    "objective.ce_norm": ({}, "sqrt_row"),
    "objective.kd_weight": ({}, 0.25),
    "objective.kd.kind": ({}, "kl_rev"),
    "objective.kd.temperature": (LIVE, 2.0),
    "objective.kd.t2_scale": ({**LIVE, "objective": {"kd": {"temperature": 2.0}}}, False),
    "objective.kd.beta": ({"objective": {"kd": {"kind": "jsd"}}}, 0.2),
    "objective.kd.alpha": ({"objective": {"kd": {"kind": "skew_fwd"}}}, 0.4),
    "objective.kd.cross_tokenizer": (LIVE, "gold"),  # the teacher shares the tokenizer: refused naming the field
    "objective.kd.tail": ({"teacher": {"cache": "@cache16"}}, "renorm"),
    "objective.task_weights": ({}, {"T/1": 4.0}),
    "objective.roles.ce": (ROLES, False),
    "objective.roles.kd": (ROLES, False),
    "objective.roles.barrier": ({**BARRIER, **ROLES, "objective": {**BARRIER["objective"], **ROLES["objective"]}},
                                False),
    "objective.barrier.kind": (BARRIER, "kl_fwd"),
    "objective.barrier.aggregate": (BARRIER, "rmse"),
    "objective.barrier.tau": (BARRIER, 0.05),
    "objective.barrier.weight": (BARRIER, 5.0),
    "objective.barrier.temperature": (BARRIER, 2.0),
    "objective.on_policy.fraction": (ON_POLICY, 0.0),
    "objective.on_policy.max_new_tokens": (ON_POLICY, 2),
    "objective.on_policy.temperature": (ON_POLICY, 0.5),
    "objective.on_policy.top_p": (ON_POLICY, 0.5),
    "objective.on_policy.seed": (ON_POLICY, 1),
    "objective.on_policy.loss": (ON_POLICY, "sampled_kl_rev"),
    "objective.on_policy.rollout_url": (ON_POLICY, "http://127.0.0.1:9"),  # nothing answers there: refused
    "objective.on_policy.sync_every": (ON_POLICY, 2),  # no rollout_url: refused naming the field
    "objective.hidden.layers": (HIDDEN, {2: 1}),
    "objective.hidden.loss": (HIDDEN, "mse"),
    "objective.hidden.weight": (HIDDEN, 3.0),
    "objective.hidden.projection": (HIDDEN, "none"),  # the teacher is wider: refused naming the field
    "objective.chunk_size": ({}, 0),  # same loss, other path: recorded in run.json
    "optim.lr": ({}, 1e-3),
    "optim.schedule": ({"optim": {"warmup_steps": 0}}, "cosine"),
    "optim.warmup_steps": ({}, 2),
    "optim.weight_decay": ({}, 0.1),
    "optim.betas": ({}, [0.8, 0.9]),
    "optim.grad_clip": ({}, 0.01),
    "optim.micro_batch": ({}, 2),
    "optim.grad_accum": ({}, 2),
    "optim.epochs": ({"optim": {"max_steps": None}}, 2),
    "optim.max_steps": ({}, 2),
    "optim.seed": ({}, 1),
    "optim.precision": ({}, "bf16-mixed"),
    "optim.gradient_checkpointing": ({}, True),  # same losses, less memory: recorded in run.json
    "checkpoint.every": ({}, 1),
    "checkpoint.keep": ({"checkpoint": {"every": 1}}, 1),
    "data.pack_length": ({"data": {"packing": True}}, 16),  # more, shorter sequences: other losses (float)
    "data.packing": ({}, True),  # the same losses (within 1e-5, tests/test_packing.py), other path: in run.json
    "logging.every": ({}, 2),
    "logging.tensorboard": ({}, True),  # event files, or refused when tensorboard is not installed
    "logging.report_to": ({}, ["tensorboard"]),  # the same, by the list
    "logging.project": ({"logging": {"report_to": ["tensorboard"]}}, "other"),  # RUN/other/ instead of RUN/kdkit/
    "probes.prompts": (PROBES, "@probes2"),
    "probes.every": (PROBES, 2),
    "probes.max_new_tokens": (PROBES, 3),
    "early_stop.coherence_floor": (FLOOR, 0.001),
    "early_stop.patience": (FLOOR, 3),
    "routing.pairs": (ROUTING, "@pairs2"),
    "routing.method": (ROUTING, "grad"),
    "routing.target_modules": (ROUTING, ["q_proj"]),
    "routing.quarantine.r": (ROUTING, 2),
    "routing.quarantine.alpha": (ROUTING, 2.0),
    "routing.refresh_every": (ROUTING, 0),
    "routing.control": ({**LIVE, "routing": {**ROUTING["routing"], "refresh_every": 0}}, "random"),
    "routing.seed": (RANDOM, 5),
    "drift_tolerance": ({}, 10.0),  # no weight moves 10: refused at the end
    "eval.server": ({}, "http://127.0.0.1:9"),  # nothing answers there: refused before training
    "eval.served_model": ({}, "other"),  # without eval.server: refused naming the field
}


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        sub = [a for a in (typing.get_args(f.annotation) or (f.annotation,))
               if isinstance(a, type) and issubclass(a, BaseModel)]
        out += _leaves(sub[0], f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def test_every_config_field_has_an_effect_entry():
    assert sorted(_leaves(TrainConfig)) == sorted(EFFECTS)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("effects")
    save_model_dir(root / "teacher", seed=1, hidden=32)
    save_model_dir(root / "student", seed=2, hidden=16)
    save_model_dir(root / "student2", seed=5, hidden=16)
    rows = toy_rows(12)
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "train2.jsonl", toy_rows(12, seed=3))
    write_jsonl(root / "routed.jsonl", [{**r, "teacher": "b"} if i % 2 else r for i, r in enumerate(rows)])
    write_jsonl(root / "with_empty.jsonl", rows + [{"prompt": "x", "completion": ""}])
    write_jsonl(root / "val.jsonl", toy_rows(4, seed=9))
    write_jsonl(root / "probes.jsonl", [{"prompt": "def f(x):\n"}, {"prompt": "Once"}])
    write_jsonl(root / "probes2.jsonl", [{"prompt": "The sky"}])
    write_jsonl(root / "pairs.jsonl", [{"prompt": r["prompt"], "hack": "    return 0\n", "clean": r["completion"]}
                                       for r in rows[:3]])
    write_jsonl(root / "pairs2.jsonl", [{"prompt": r["prompt"], "hack": "    pass\n", "clean": r["completion"]}
                                        for r in rows[3:6]])
    for name, k in (("cache", 101), ("cache16", 16)):
        precompute(root / "teacher", root / "train.jsonl", root / name, PrecomputeSettings(top_k=k, shard_rows=8),
                   progress=False, log=lambda m: None)
    precompute(root / "teacher", root / "val.jsonl", root / "valcache", PrecomputeSettings(top_k=101, shard_rows=8,
               max_length=64), progress=False, log=lambda m: None)
    return root


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set(cfg: dict, dotted: str, value) -> dict:
    out = json.loads(json.dumps(cfg))
    node = out
    parts = dotted.split(".")
    if parts[:2] == ["objective", "roles"]:  # a per-role switch: the role 'anchor'
        parts = ["objective", "roles", "anchor", parts[2]]
    if parts[0] == "teachers":  # a field of the teacher named 'b'
        parts = ["teachers", "b", parts[1]]
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _resolve(obj, root: Path):
    if isinstance(obj, dict):
        return {k: _resolve(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith("@"):
        name = obj[1:]
        return str(root / (f"{name}.jsonl" if name in ("train2", "routed", "with_empty", "val", "probes", "probes2",
                                                                 "pairs", "pairs2") else name))
    return obj


def _signature(cfg: dict, root: Path, out: Path) -> dict:
    base = {"student": {"path": "@student", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "teacher": {"cache": "@cache"}, "data": {"train": str(root / "train.jsonl"), "max_length": 64},
            "objective": {"kd_weight": 1.0},
            "optim": {"lr": 5e-3, "micro_batch": 4, "max_steps": 3, "epochs": 1, "schedule": "constant"},
            "checkpoint": {"every": 0}}
    full = _resolve(_merge(base, cfg), root)
    if full.get("reference", {}).get("kind") == "cache":  # the teacher's full cache as the barrier's reference
        full["reference"]["path"] = str(root / "cache")
    p = out.with_suffix(".yaml")
    p.write_text(yaml.safe_dump(full))
    try:
        train(load_train_config(p), out, progress=False, log=lambda m: None)
    except KdkitError as e:
        return {"refused": str(e).replace(str(out), "RUN")}
    final = out / "final"
    weights = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(final.glob("*.safetensors"))}
    metrics = [{k: v for k, v in json.loads(x).items() if k not in ("step_time_s", "tokens_per_s")}
               for x in (out / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    files = sorted(re.sub(r"/\d+\.\d+/", "/<time>/", str(f.relative_to(out)))  # TensorBoard's hparams.yml
                   for f in out.rglob("*") if f.is_file() and "events" not in f.name)
    events = any("events" in f.name for f in out.rglob("*"))
    epochs = (out / "epochs.jsonl").read_text() if (out / "epochs.jsonl").is_file() else None  # stopped at step 0
    probes = (out / "probes.jsonl").read_text() if (out / "probes.jsonl").is_file() else None
    return {"weights": weights, "metrics": metrics, "epochs": epochs, "probes": probes, "run": run,
            "files": files, "events": events}


def test_a_run_is_its_own_signature(world, tmp_path):
    assert _signature({}, world, tmp_path / "a") == _signature({}, world, tmp_path / "b")


@pytest.mark.parametrize("field", sorted(EFFECTS))
def test_each_field_changes_the_run_or_is_refused(world, tmp_path, field):
    context, other = EFFECTS[field]
    before = _signature(context, world, tmp_path / "before")
    assert "refused" not in before, before
    after = _signature(_set(_merge({}, context), field, other), world, tmp_path / "after")
    assert after != before, f"{field}={other!r} changed nothing"
    if "refused" in after:
        assert field in after["refused"] or field.split(".")[-1] in after["refused"], after["refused"]


@pytest.mark.parametrize("field", sorted(_leaves(TrainConfig)))
def test_a_resume_refuses_every_field_that_changes_a_result_and_reports_the_others(tmp_path, field):
    # each field, several teachers' and on-policy settings among them: a resume compares it with the value the
    # run's weights were trained with (final/kdkit.json here; a checkpoint's state.json likewise)
    from kdkit.models.checkpoint import RESUME_FREE, check_resume
    from kdkit.util.errors import TrainingError

    saved, now = _set({}, field, "before"), _set({}, field, "after")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "kdkit.json").write_text(json.dumps({"steps": 3, "config": saved}))

    class Resumed:  # the config given to --resume
        def model_dump(self, mode: str) -> dict:
            return now

    shown = _set({}, field, "x")
    path = ".".join(_path(shown))
    said: list[str] = []
    if field.split(".")[0] in RESUME_FREE:
        check_resume(tmp_path, Resumed(), log=said.append)
        assert said == [f"resuming with settings that do not change the result changed: {path}: 'before' → 'after'"]
    else:
        with pytest.raises(TrainingError, match=re.escape(f"{path}: 'before' → 'after'")):
            check_resume(tmp_path, Resumed(), log=said.append)


def _path(d: dict) -> list[str]:
    k, v = next(iter(d.items()))
    return [k, *(_path(v) if isinstance(v, dict) else [])]
