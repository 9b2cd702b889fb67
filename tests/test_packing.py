"""data.packing: a micro-batch's rows run end to end in fewer sequences (positions restart per row, no attention
across rows); the outputs are put back in the batch's layout, so every loss equals the unpacked run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdkit.config.load import ConfigError, load_train_config
from kdkit.data import rows as kdata
from kdkit.util.errors import KdkitError
from tests.helpers import tiny_llama
from tests.test_train import _cfg, _final, _jsonl, _run, world  # noqa: F401 - the training world fixture


def _batch(lengths: list[int], pad: int = 0) -> kdata.Batch:
    rows = [kdata.TokenizedRow(list(range(10 * i + 1, 10 * i + 1 + n)), [False] + [True] * (n - 1))
            for i, n in enumerate(lengths)]
    return kdata.collate(rows, pad)


def test_packing_lays_rows_end_to_end_and_unpacks_to_the_batch():
    batch = _batch([5, 2, 7, 3, 1])
    pk = kdata.pack(batch, capacity=8, pad_id=0)
    # first-fit decreasing into 8 slots: [7, 1], [5, 3], [2]
    assert pk.input_ids.shape == (3, 8)
    valid = batch.attention_mask.bool()
    assert torch.equal(pk.unpack(pk.input_ids)[valid], batch.input_ids[valid])  # every token back in its place
    assert torch.equal(pk.unpack(pk.position_ids)[valid], (batch.attention_mask.cumsum(1) - 1)[valid])
    assert pk.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0] and pk.position_ids[2].tolist()[:2] == [0, 1]
    # a row longer than the capacity has a sequence of its own; nothing is cut
    pk = kdata.pack(_batch([9, 2]), capacity=4, pad_id=0)
    assert pk.input_ids.shape == (2, 9) and int((pk.input_ids != 0).sum()) == 11


def test_packed_logits_equal_the_rows_apart():
    model = tiny_llama(101, seed=3, hidden=32, layers=2).eval()
    batch = _batch([6, 3, 8, 2])
    pk = kdata.pack(batch, capacity=64, pad_id=0)
    assert pk.input_ids.shape[0] == 1  # all four rows in one sequence
    with torch.no_grad():
        apart = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        packed = pk.unpack(model(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False).logits)
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(packed[valid], apart[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [
    {"objective": {"kd_weight": 1.0}},  # cached teacher, chunked loss
    {"objective": {"kd_weight": 1.0, "chunk_size": 0}},  # dense loss
    {"objective": {"kd_weight": 0.5, "barrier": {"kind": "kl_rev", "aggregate": "rmse", "tau": 0.0, "weight": 5.0}},
     "reference": {"kind": "base"}},  # LoRA on a barrier to the base
    {"student": {"lora": None}, "objective": {"kd_weight": 1.0}},  # full fine-tune
], ids=["kd-chunked", "kd-dense", "barrier-base", "full"])
def test_a_packed_run_has_the_unpacked_runs_losses(world, tmp_path, case):  # noqa: F811
    runs = {}
    for packing in (False, True):
        sections = {**case, "data": {"packing": packing}}
        if "student" in case:
            sections["student"] = {"path": str(world / "student")}
        runs[packing] = Path(_run(_cfg(world, tmp_path, **sections), tmp_path / f"p{packing}")["run_dir"])
    a, b = (_jsonl(runs[p] / "metrics.jsonl") for p in (False, True))
    assert len(a) == len(b) == 8
    for x, y in zip(a, b, strict=True):
        for k in ("total_loss", "ce_loss", "kl_loss", "barrier", "top1_agree"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-5), (x["step"], k)
        assert y["tokens"] == x["tokens"]
    for e, f in zip(_jsonl(runs[False] / "epochs.jsonl"), _jsonl(runs[True] / "epochs.jsonl"), strict=True):
        assert f["val_loss"] == pytest.approx(e["val_loss"], rel=1e-5)
    fa, fb = _final(runs[False]), _final(runs[True])
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sections, match", [
    ({"optim": {"micro_batch": 1}}, "data.packing: optim.micro_batch is 1"),
    ({"objective": {"kd_weight": 1.0, "on_policy": {"fraction": 0.5}}, "teacher": {"model": "@teacher"}},
     "data.packing: on-policy steps"),
])
def test_packing_that_cannot_take_effect_is_refused(world, tmp_path, sections, match):  # noqa: F811
    if sections.get("teacher") == {"model": "@teacher"}:
        sections = {**sections, "teacher": {"cache": None, "model": str(world / "teacher")}}
    with pytest.raises(ConfigError, match=match):
        load_train_config(_cfg(world, tmp_path, data={"packing": True}, **sections))
    with pytest.raises(ConfigError, match="data.pack_length: data.packing is false"):
        load_train_config(_cfg(world, tmp_path, data={"pack_length": 64}))


def test_a_model_that_lets_packed_rows_attend_to_each_other_is_refused(world, tmp_path, monkeypatch):  # noqa: F811
    import transformers.masking_utils as mu

    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)  # a plain causal mask
    with pytest.raises(KdkitError, match="data.packing: this model lets packed rows attend to each other"):
        _run(_cfg(world, tmp_path, data={"packing": True}), tmp_path / "leak")
    assert not (tmp_path / "leak" / "metrics.jsonl").exists()
