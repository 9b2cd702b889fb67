"""kdkit student init: a depth-pruned student made from its teacher's own layers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.models.load import load_causal_lm, load_tokenizer
from kdkit.models.student import spread
from kdkit.util.errors import KdkitError
from tests.helpers import save_model_dir


def test_spread_keeps_the_first_and_the_last_evenly():
    assert spread(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert spread(30, 2) == [0, 29] and spread(30, 1) == [29] and spread(6, 6) == [0, 1, 2, 3, 4, 5]
    for total in range(1, 40):
        for n in range(1, total + 1):
            got = spread(total, n)
            assert len(got) == n and got == sorted(set(got)) and got[-1] == total - 1 and (n == 1 or got[0] == 0)
    with pytest.raises(KdkitError, match="keep 1 to 30"):
        spread(30, 31)


def test_the_student_holds_the_teachers_layers_and_tokenizer(tmp_path):
    teacher = save_model_dir(tmp_path / "teacher", seed=4, layers=6)
    tok_src = load_tokenizer(teacher)
    tok_src.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok_src.save_pretrained(str(teacher))
    res = CliRunner().invoke(app, ["student", "init", "--from", str(teacher), "--layers", "3",
                                   "--out", str(tmp_path / "student")])
    assert res.exit_code == 0, res.output
    assert "3 of the teacher's 6 decoder layers (0, 2, 5)" in res.output
    student = tmp_path / "student"
    t, s = load_file(str(teacher / "model.safetensors")), load_file(str(student / "model.safetensors"))
    for new, old in enumerate([0, 2, 5]):
        for k in (k for k in t if k.startswith(f"model.layers.{old}.")):
            assert torch.equal(s[k.replace(f"layers.{old}.", f"layers.{new}.")], t[k]), k
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[k], t[k])
    assert not any(k.startswith("model.layers.3.") for k in s)
    model = load_causal_lm(student)
    assert model.config.num_hidden_layers == 3
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    # the student is the teacher with layers 1, 3, 4 skipped: the same forward, run by hand
    ref = load_causal_lm(teacher)
    h = ref.model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    emb = ref.model.rotary_emb(h, pos)
    mask = torch.full((5, 5), float("-inf")).triu(1)[None, None]
    for i in (0, 2, 5):
        h = ref.model.layers[i](h, attention_mask=mask, position_ids=pos, position_embeddings=emb)
        h = h[0] if isinstance(h, tuple) else h
    torch.testing.assert_close(model(input_ids=ids).logits, ref.lm_head(ref.model.norm(h)), rtol=1e-5, atol=1e-5)
    assert load_tokenizer(student).chat_template == tok_src.chat_template
    info = json.loads((student / "kdkit-student.json").read_text())
    assert info["kept_layers"] == [0, 2, 5] and info["teacher_layers"] == 6 and info["choice"] == "spread"


@pytest.mark.parametrize("args, match", [
    (["--keep", "0,9"], "layer indices run from 0 to 5"),
    (["--keep", "3,1"], "list each layer once, in increasing order"),
    (["--keep", "a,b"], "expected comma-separated layer indices"),
    (["--layers", "6"], "makes a copy of the teacher"),
    (["--layers", "2", "--keep", "0,1"], "one of them"),
    ([], "one of them"),
])
def test_a_student_that_cannot_be_made_is_refused(tmp_path, args, match):
    teacher = save_model_dir(tmp_path / "teacher", seed=4, layers=6)
    res = CliRunner().invoke(app, ["student", "init", "--from", str(teacher), "--out", str(tmp_path / "s"), *args])
    assert res.exit_code != 0 and match in res.output, res.output
    assert not (tmp_path / "s").exists()


def test_student_init_never_writes_into_a_directory_it_did_not_write(tmp_path):
    teacher = save_model_dir(tmp_path / "teacher", seed=4, layers=4)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(app, ["student", "init", "--from", str(teacher), "--layers", "2", "--out",
                                   str(tmp_path / "mine")])
    assert res.exit_code != 0 and "was not written by kdkit" in res.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    for _ in range(2):  # its own student is replaced
        res = CliRunner().invoke(app, ["student", "init", "--from", str(teacher), "--keep", "0,3", "--out",
                                       str(tmp_path / "s")])
        assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "kdkit-student.json").read_text())["kept_layers"] == [0, 3]
