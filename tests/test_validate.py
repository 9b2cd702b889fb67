"""What `kdkit validate` says valid, `kdkit train` runs; what train refuses, validate refuses first, in the
same words (one check path: kdkit.train.preflight). And options that combine into a no-op are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config.load import ConfigError, load_train_config
from kdkit.config.schema import RESOLVED_MARK
from kdkit.models.generation import GenerationSettings
from kdkit.train import train
from kdkit.util.errors import KdkitError
from tests.helpers import save_model_dir, toy_rows, write_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate_world")
    save_model_dir(root / "student", seed=2, hidden=16)
    save_model_dir(root / "teacher", seed=1, hidden=32)
    shutil.copytree(root / "student", root / "no_template")
    (root / "no_template" / "chat_template.jinja").unlink()
    write_jsonl(root / "train.jsonl", toy_rows(8))
    write_jsonl(root / "chat.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": r["completion"]}]}
                                      for r in toy_rows(8)])
    write_jsonl(root / "chat_probes.jsonl", [{"messages": [{"role": "user", "content": "def f(x):"}]}])
    write_jsonl(root / "empty_probe.jsonl", [{"prompt": ""}])
    write_jsonl(root / "same_pairs.jsonl", [{"prompt": "def f(x):\n", "hack": "    return 1\n",
                                             "clean": "    return 1\n"}])
    return root


def _body(root: Path, **over) -> dict:
    body = {"student": {"path": str(root / "student")}, "teacher": {"model": str(root / "teacher")},
            "data": {"train": str(root / "train.jsonl"), "max_length": 64},
            "optim": {"lr": 5e-3, "micro_batch": 4, "epochs": 1}, "checkpoint": {"every": 0}}
    for k, v in over.items():
        body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) else v
    return body


def _write(tmp: Path, body: dict | str) -> Path:
    p = tmp / "cfg.yaml"
    p.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return p


REFUSED_BY_BOTH = {
    "lora_target_missing": ({"student": {"lora": {"target_modules": ["q_proj", "wq"]}}},
                            r"student.lora.target_modules: \['wq'\] are not modules"),
    "hidden_layer_out_of_range": ({"objective": {"hidden": {"layers": {1: 7}}}},
                                  r"objective.hidden.layers: 1 → 7 is out of range"),
    "hidden_widths_without_projection": ({"objective": {"hidden": {"layers": {1: 1}, "projection": "none"}}},
                                         "projection: none needs equal widths"),
    "messages_rows_across_tokenizers": ({"data": {"train": "@chat.jsonl"},
                                         "objective": {"kd": {"cross_tokenizer": "gold"}}},
                                        "cross-tokenizer distillation aligns one text"),
    "routing_pairs_with_identical_sides": ({"student": {"lora": {"target_modules": ["q_proj", "v_proj"]}},
                                            "routing": {"pairs": "@same_pairs.jsonl", "target_modules": ["v_proj"]}},
                                           "fields 'hack' and 'clean': the two sides are the same tokens"),
    "chat_probes_without_a_template": ({"student": {"path": "@no_template"},
                                        "probes": {"prompts": "@chat_probes.jsonl", "every": 1}},
                                       "field 'messages': the tokenizer has no chat template"),
    "empty_probe_prompt": ({"probes": {"prompts": "@empty_probe.jsonl", "every": 1}}, "field 'prompt': empty"),
    "missing_teacher_cache": ({"teacher": {"model": None, "cache": "@no-cache-here"}},
                              r"teacher.cache: \S*no-cache-here: no such cache directory"),
}


def _resolve(obj, root: Path):
    if isinstance(obj, dict):
        return {k: _resolve(v, root) for k, v in obj.items()}
    return str(root / obj[1:]) if isinstance(obj, str) and obj.startswith("@") else obj


def test_a_missing_cache_is_named_by_the_config_line_or_the_set_that_gave_it(world, tmp_path):
    cfg = _write(tmp_path, _body(world, teacher={"model": None, "cache": str(tmp_path / "nowhere")}))
    lines = cfg.read_text().splitlines()
    line = next(i for i, x in enumerate(lines, 1) if x == "  cache: " + str(tmp_path / "nowhere"))
    res = runner.invoke(app, ["validate", str(cfg)], terminal_width=400)
    assert res.exit_code == 2 and f"{cfg}:{line}: teacher.cache: {tmp_path / 'nowhere'}: no such cache" in \
        " ".join(res.output.split()), res.output
    res = runner.invoke(app, ["validate", str(cfg), "--set", f"teacher.cache={tmp_path / 'elsewhere'}"],
                        terminal_width=400)
    assert res.exit_code == 2 and "--set teacher.cache: teacher.cache: " in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("case", sorted(REFUSED_BY_BOTH))
def test_validate_refuses_what_train_would_refuse_in_the_same_words(world, tmp_path, case):
    over, message = REFUSED_BY_BOTH[case]
    body = _resolve(_body(world), world)
    for k, v in _resolve(over, world).items():
        body[k] = {**body.get(k, {}), **v}
    cfg = _write(tmp_path, body)
    res = runner.invoke(app, ["validate", str(cfg)], terminal_width=400)
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and pytest.importorskip("re").search(message, out), out
    with pytest.raises(KdkitError, match=message):
        train(load_train_config(cfg), tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


NO_EFFECT = {
    "kd temperature at kd_weight 0": ({"objective": {"kd_weight": 0.0, "kd": {"temperature": 2.0}}},
                                      "objective.kd.temperature: objective.kd_weight is 0"),
    "task weights at kd_weight 0": ({"objective": {"kd_weight": 0.0, "task_weights": {"T/0": 2.0}}},
                                    "objective.task_weights.T/0: objective.kd_weight is 0"),
    "on-policy settings at fraction 0": ({"objective": {"on_policy": {"fraction": 0.0, "max_new_tokens": 8}}},
                                         "objective.on_policy.max_new_tokens: objective.on_policy.fraction is 0"),
    "beta with kl_rev, even at its default": ({"objective": {"kd": {"kind": "kl_rev", "beta": 0.5}}},
                                              "objective.kd.beta: only jsd takes beta"),
    "keep with every 0": ({"checkpoint": {"every": 0, "keep": 3}}, "checkpoint.keep: checkpoint.every is 0"),
    "teacher dtype float64": ({"teacher": {"dtype": "float64"}}, "teacher.dtype"),
    "teacher dtype misspelt": ({"teacher": {"dtype": "flaot16"}}, "teacher.dtype"),
}


@pytest.mark.parametrize("case", sorted(NO_EFFECT))
def test_options_that_take_no_effect_or_do_not_exist_are_refused_by_name(world, tmp_path, case):
    over, message = NO_EFFECT[case]
    body = _body(world)
    for k, v in over.items():
        body[k] = {**body.get(k, {}), **v}
    with pytest.raises(ConfigError, match=message):
        load_train_config(_write(tmp_path, body))


def test_a_resolved_config_with_every_default_still_loads_and_the_marker_is_what_allows_it(world, tmp_path):
    run = tmp_path / "run"
    loaded = load_train_config(_write(tmp_path, _body(world)))
    train(loaded, run, progress=False, log=lambda m: None)
    text = (run / "config.yaml").read_text()
    assert "beta:" not in text  # kl_fwd reads no beta: the resolved config leaves it out
    assert load_train_config(run / "config.yaml").model_dump() == loaded.model_dump()
    copied = tmp_path / "copied.yaml"
    copied.write_text(text.split("\n", 1)[1])  # a user's copy of it loads as well: only what applies is in it
    assert load_train_config(copied).model_dump() == loaded.model_dump()
    # a resolved config of every field (as runs wrote them before): the marker is what lets beta at its default load
    every = yaml.safe_dump(loaded.model_dump(mode="json"), sort_keys=False)
    (tmp_path / "every.yaml").write_text(RESOLVED_MARK + "\n" + every)
    assert load_train_config(tmp_path / "every.yaml").objective.kd.beta == 0.5
    (tmp_path / "every.yaml").write_text(every)
    with pytest.raises(ConfigError, match="objective.kd.beta: only jsd takes beta"):
        load_train_config(tmp_path / "every.yaml")


def test_duplicate_keys_are_refused_naming_both_lines(world, tmp_path):
    text = (f"student:\n  path: {world / 'student'}\ndata:\n  train: {world / 'train.jsonl'}\n"
            "optim:\n  lr: 0.001\n  epochs: 1\n  lr: 5.0\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:8: key 'lr' is given twice in one section \(lines 6 and 8\)"):
        load_train_config(_write(tmp_path, text))
    res = runner.invoke(app, ["validate", str(tmp_path / "cfg.yaml")], terminal_width=400)
    assert res.exit_code == 2 and "given twice" in res.output


@pytest.mark.parametrize("field, value", [("top_p", 2.0), ("top_p", 0.0), ("top_p", -0.1), ("temperature", 0.0),
                                          ("top_k", -1), ("repetition_penalty", 0.0), ("n_samples", 0)])
def test_generation_settings_out_of_range_are_refused(field, value):
    with pytest.raises(KdkitError, match=f"--{field.replace('_', '-')} must be"):
        GenerationSettings(**{field: value, "do_sample": True})


def test_generate_refuses_top_p_out_of_range(world, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def f(x):\n"}])
    for top_p in ("2.0", "0.0"):
        res = runner.invoke(app, ["generate", "--model", str(world / "teacher"), "--data", str(tmp_path / "p.jsonl"),
                                  "--out", str(tmp_path / "o.jsonl"), "--temperature", "1.0", "--top-p", top_p,
                                  "--no-progress"], terminal_width=400)
        assert res.exit_code == 2 and "--top-p must be in (0, 1]" in res.output, res.output
    assert not (tmp_path / "o.jsonl").exists()
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["p.jsonl"]'  # no lock file either
