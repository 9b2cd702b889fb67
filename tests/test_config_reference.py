"""The config reference is generated from the config's models: the defaults YAML loads back to the defaults,
every field is in it and in the docs' table, and an unknown key names where it came from and what is near."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config.load import ConfigError, load_train_config
from kdkit.config.reference import REQUIRED, defaults_yaml, fields, reference_table, schema
from kdkit.config.schema import TrainConfig

PAGE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"


def _filled(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "defaults.yaml"
    p.write_text(text.replace(f"path: {REQUIRED}", "path: s", 1).replace(f"train: {REQUIRED}", "train: t.jsonl", 1))
    return p


def test_the_defaults_yaml_loads_back_to_every_default(tmp_path):
    text = defaults_yaml()
    raw = yaml.safe_load(text)
    assert raw["student"]["path"] == REQUIRED and raw["data"]["train"] == REQUIRED
    loaded = load_train_config(_filled(tmp_path, text))
    assert loaded.model_dump() == load_train_config(
        _filled(tmp_path, "student: {path: <required>}\ndata: {train: <required>}\n")).model_dump()
    for d in fields(TrainConfig):  # every field is there, commented out or not, with its description
        name = d.key.rsplit(".", 1)[-1]
        assert re.search(rf"^\s*(# )?{re.escape(name)}:", text, re.M), d.key
        assert d.description, f"{d.key} has no description"


def test_a_commented_section_loads_once_uncommented(tmp_path):
    """student.lora, uncommented as it is written, is a valid section at its defaults."""
    lines = defaults_yaml().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# lora:"))
    for i in range(start, start + 5):
        lines[i] = lines[i].replace("# ", "", 1)
    cfg = load_train_config(_filled(tmp_path, "\n".join(lines) + "\n"))
    assert cfg.student.lora is not None and cfg.student.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.student.lora.r == 8


def test_readme_shows_the_generated_reference():
    text = PAGE.read_text()
    shown = text.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert shown == reference_table(), "docs/config-reference.md is stale: python scripts/docs_config.py"
    for d in fields(TrainConfig):
        assert d.section or f"| `{d.key}` |" in shown


def test_the_schema_and_the_commands():
    s = schema()
    assert set(s["properties"]) == set(TrainConfig.model_fields) and s["required"] == ["student", "data"]
    runner = CliRunner()
    assert json.loads(runner.invoke(app, ["config", "schema"]).output) == s
    assert runner.invoke(app, ["config", "defaults"]).output == defaults_yaml()
    assert runner.invoke(app, ["config", "reference"]).output == reference_table()


def test_an_unknown_key_names_its_origin_and_the_nearest_keys(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("student: {path: s}\ndata:\n  train: t.jsonl\n  val: v.jsonl\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(cfg)
    assert str(e.value).startswith(f"{cfg}:4: field 'data.val': unknown field (did you mean 'data.validation'?); "
                                   f"the fields of data: train, validation, max_length")
    cfg.write_text("student: {path: s}\ndata: {train: t.jsonl}\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(cfg, ["optim.learning_rate=1e-4"])
    assert str(e.value).startswith("--set optim.learning_rate: field 'optim.learning_rate': unknown field "
                                   "(did you mean 'optim.lr'?)")
    with pytest.raises(ConfigError, match=r"^--set optim.lr: field 'optim.lr': Input should be a valid number"):
        load_train_config(cfg, ["optim.lr=abc"])
    with pytest.raises(ConfigError, match=r"^--set optimm.lr: field 'optimm': unknown field \(did you mean 'optim'\?\)"):
        load_train_config(cfg, ["optimm.lr=1"])


def test_a_rule_over_several_fields_names_the_field_the_user_wrote(tmp_path):
    """An option without effect is refused by a rule on the whole config; the error names the user's own
    key (as --set gave it, or the file's line), never '<root>'."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("student: {path: s}\ndata: {train: t.jsonl}\nteacher: {model: t}\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(cfg, ["objective.kd.beta=0.5"])
    assert str(e.value) == "--set objective.kd.beta: only jsd takes beta; objective.kd.kind is kl_fwd"
    cfg.write_text("student: {path: s}\ndata: {train: t.jsonl}\nteacher: {model: t}\nobjective:\n  kd:\n"
                   "    beta: 0.5\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(cfg))}:6: objective.kd.beta: only jsd takes"):
        load_train_config(cfg)
    with pytest.raises(ConfigError, match=r"field 'student.lora.rank': unknown field \(did you mean 'student.lora.r'"):
        load_train_config(cfg, ["student.lora.rank=4", "objective.kd.beta=null"])


def test_the_resolved_config_shows_only_what_applies(tmp_path):
    """A cached teacher under kl_fwd: no teacher.top_k (a served teacher's K), no beta or alpha; what is left out
    loads back at its default, and a field that applies is kept even at its default."""
    import yaml

    from kdkit.config.load import dump_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("student: {path: s}\ndata: {train: t.jsonl}\nteacher: {cache: c}\n")
    loaded = load_train_config(cfg)
    text = dump_config(loaded)
    shown = yaml.safe_load(text)
    assert "top_k" not in shown["teacher"] and "served_model" not in shown["teacher"] and "dtype" not in shown["teacher"]
    assert "beta" not in shown["objective"]["kd"] and "alpha" not in shown["objective"]["kd"]
    assert shown["objective"]["kd"]["kind"] == "kl_fwd" and shown["objective"]["kd"]["tail"] == "bucket"
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(text)
    assert load_train_config(resolved).model_dump() == loaded.model_dump()
    cfg.write_text("student: {path: s}\ndata: {train: t.jsonl}\nteacher: {url: 'http://h:1'}\n"
                   "objective: {kd: {kind: jsd}}\n")
    shown = yaml.safe_load(dump_config(load_train_config(cfg)))
    assert shown["teacher"]["top_k"] == 64 and shown["objective"]["kd"]["beta"] == 0.5  # served, jsd: they apply
    assert "alpha" not in shown["objective"]["kd"]


def test_without_a_teacher_the_resolved_kd_weight_is_zero(tmp_path):
    from kdkit.config.load import dump_config

    cfg = tmp_path / "ce.yaml"
    cfg.write_text("student: {path: s}\ndata: {train: t.jsonl}\n")
    loaded = load_train_config(cfg)
    assert loaded.objective.kd_weight == 0.0  # no teacher: no KD term, and the resolved config says so
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_config(loaded))
    assert "kd_weight: 0.0" in resolved.read_text()
    assert load_train_config(resolved).model_dump() == loaded.model_dump()
    cfg.write_text("student: {path: s}\nteacher: {cache: c}\ndata: {train: t.jsonl}\n")
    assert load_train_config(cfg).objective.kd_weight == 1.0
    cfg.write_text("student: {path: s}\ndata: {train: t.jsonl}\nobjective: {kd_weight: 0.5}\n")
    with pytest.raises(ConfigError, match=":3: objective.kd_weight: there is no teacher section"):
        load_train_config(cfg)
