"""`kdkit export`: a gated pack as a Hugging Face directory with provenance and a model card from the registry."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config.load import load_train_config
from kdkit.decide.export import EXPORT_FILE, export_pack, verify_export
from kdkit.decide.gate import gate
from kdkit.decide.registry import Registry, RegistryError
from kdkit.evaluate.passrate import GenerationSettings
from kdkit.evaluate.sandbox import Limits
from kdkit.evaluate.tasks import tasks_fingerprint
from kdkit.models.load import load_causal_lm, merge
from kdkit.train import train
from kdkit.util.errors import KdkitError
from tests.helpers import distill_world, save_model_dir


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A distilled LoRA run, merged and gated (promoted as asked: three toy tasks cannot show a drop) with drift."""
    root = distill_world(tmp_path_factory.mktemp("export"))
    tasks = root / "tasks.jsonl"
    cfg = {"student": {"path": str(root / "student"), "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]}},
           "teacher": {"cache": str(root / "cache")}, "data": {"train": str(root / "train.jsonl"), "max_length": 64},
           "optim": {"lr": 1e-2, "micro_batch": 4, "max_steps": 3}, "checkpoint": {"every": 0}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    train(load_train_config(root / "cfg.yaml"), root / "run", progress=False, log=lambda m: None)
    merge(root / "run", root / "pack")
    reg = Registry(root / "ws")
    reg.promote(reg.register(root / "student", name="base").id)
    res = gate(reg, str(root / "pack"), tasks, settings=GenerationSettings(max_new_tokens=12),
               limits=Limits(timeout_s=5), log=lambda m: None, promote_undecided=True, drift=True)
    assert res.decision == "KEEP" and res.drift["train"] is not None
    return root, reg, reg.pack(res.candidate)


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")
def test_an_export_loads_as_the_pack_carries_its_provenance_and_its_card_is_the_registrys(kept, tmp_path):
    root, reg, pack = kept
    out = export_pack(reg, pack.name, tmp_path / "export")
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    with torch.no_grad():  # transformers loads it as it is, and it is the pack's model
        assert torch.equal(load_causal_lm(out)(ids).logits, load_causal_lm(pack.path)(ids).logits)
    config = reg.pack_config(pack.id)
    assert config == (root / "run" / "config.yaml").read_text()  # the gate found the merged pack's run
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
    cache_key = json.loads((root / "cache" / "manifest.json").read_text())["key"]
    assert meta["kdkit.pack_sha256"] == pack.weights_sha256 and meta["kdkit.base_sha256"] == reg.pack("base").weights_sha256
    assert meta["kdkit.config_sha256"] == hashlib.sha256(config.encode()).hexdigest()
    assert meta["kdkit.teacher_cache_key"] == cache_key and json.loads(meta["kdkit.pack"])["id"] == pack.id
    g = reg.gates()[-1]
    assert json.loads(meta["kdkit.gate"]) == {"id": g["id"], "decision": "KEEP"}
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    ev = reg.evaluations(pack.id)[-1]  # the card's numbers are the registry's
    result = front["model-index"][0]["results"][0]
    assert result["metrics"][0]["value"] == round(ev["n_passed"] / ev["n_tasks"], 6)
    assert result["dataset"]["revision"] == tasks_fingerprint(root / "tasks.jsonl") == ev["tasks_sha256"]
    assert front["base_model"] == str(root / "student") and "distillation" in front["tags"] and "lora" in front["tags"]
    assert "Undecided, promoted as asked" in card and f"cache key `{cache_key}`" in card
    drift = json.loads(g["metrics"])["drift"]["train"]
    assert f"| train | {drift['kl_base_cand_mean']:.4g} | {drift['kl_base_cand_p95']:.4g} |" in card
    assert verify_export(reg, out) == []
    # an edit, an added file, a removed file: each named
    (out / "README.md").write_text(card + "edited\n")
    (out / "notes.txt").write_text("x")
    (out / "generation_config.json").unlink()
    problems = verify_export(reg, out)
    assert "README.md: changed since the export" in problems and "notes.txt: added since the export" in problems
    assert "generation_config.json: removed since the export" in problems
    assert any(p.startswith("README.md: the model card is not the one") for p in problems)
    res = CliRunner().invoke(app, ["export", "--verify", str(out), "--workspace", str(reg.workspace)])
    assert res.exit_code == 1 and "notes.txt: added since the export" in res.output
    assert export_pack(reg, pack.name, out) == out and verify_export(reg, out) == []  # an earlier export: rewritten


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")
def test_an_ungated_pack_exports_only_when_asked_and_never_over_anothers_directory(kept, tmp_path):
    root, reg, pack = kept
    other = reg.register(save_model_dir(tmp_path / "other", seed=9, hidden=16), name="never-gated")
    with pytest.raises(RegistryError, match="no gate judged it; export it anyway with --ungated"):
        export_pack(reg, other.name, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    card = (export_pack(reg, other.name, tmp_path / "x", ungated=True) / "README.md").read_text()
    assert card.split("---\n", 2)[2].startswith("\n# never-gated\n\n> **Never gated.**")  # first, after the title
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(KdkitError, match="was not written by kdkit"):
        export_pack(reg, pack.name, mine)
    assert [f.name for f in mine.iterdir()] == ["keep.txt"]
    res = CliRunner().invoke(app, ["export", pack.name, "--workspace", str(reg.workspace)])
    assert res.exit_code == 2 and "give PACK and --out" in res.output
    res = CliRunner().invoke(app, ["export", pack.name, "--out", str(tmp_path / "c"), "--workspace",
                                   str(reg.workspace)])
    assert res.exit_code == 0 and (tmp_path / "c" / EXPORT_FILE).is_file(), res.output


def test_a_workspace_of_an_earlier_kdkit_gains_the_gate_metrics_column(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    con = sqlite3.connect(ws / "registry.sqlite")
    con.execute("CREATE TABLE gates (id INTEGER PRIMARY KEY, candidate_id INTEGER NOT NULL, baseline_id INTEGER NOT "
                "NULL, rule TEXT NOT NULL, decision TEXT NOT NULL, regressed TEXT NOT NULL, fixed TEXT NOT NULL, "
                "p_value REAL NOT NULL, reason TEXT NOT NULL, created INTEGER NOT NULL)")
    con.commit()
    con.close()
    reg = Registry(ws)
    a = reg.register(save_model_dir(tmp_path / "a", seed=1, hidden=16))
    b = reg.register(save_model_dir(tmp_path / "b", seed=2, hidden=16))
    reg.record_gate(b.id, a.id, {}, "REVERT", [], [], 1.0, "r", expected_production=None, metrics={"drift": None})
    assert json.loads(reg.gates()[-1]["metrics"]) == {"drift": None}
