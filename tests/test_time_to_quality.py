"""benchmarks/time_to_quality.py: its one evaluator against float64 sums, the curve arithmetic, and the clock
that saves students at marks and stops a run at its budget (the clock moved by hand, no sleeps)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import time_to_quality as ttq  # noqa: E402


def test_answer_scores_match_float64_sums():
    g = torch.Generator().manual_seed(0)
    n, vocab, start = 9, 13, 4
    t_logits, s_logits = torch.randn(n, vocab, generator=g) * 3, torch.randn(n, vocab, generator=g) * 3
    ids = torch.randint(0, vocab, (n,), generator=g).tolist()
    got = ttq.answer_scores(t_logits.half(), s_logits.half(), ids, start)
    t, s = t_logits.half().double(), s_logits.half().double()
    kl = kl_rev = ce = 0.0
    for pos in range(start - 1, n - 1):  # position pos predicts token pos + 1
        zt, zs = math.log(sum(math.exp(v) for v in t[pos].tolist())), math.log(sum(math.exp(v) for v in s[pos].tolist()))
        lt, ls = [v - zt for v in t[pos].tolist()], [v - zs for v in s[pos].tolist()]
        kl += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls, strict=True))
        kl_rev += sum(math.exp(b) * (b - a) for a, b in zip(lt, ls, strict=True))
        ce -= ls[ids[pos + 1]]
    assert got["tokens"] == n - start
    assert got["kl"] == pytest.approx(kl, rel=1e-5) and got["kl"] > 0
    assert got["kl_rev"] == pytest.approx(kl_rev, rel=1e-5) and got["kl_rev"] > 0
    assert got["ce"] == pytest.approx(ce, rel=1e-5)


def test_seconds_to_is_the_first_saved_student_there():
    curve = [{"seconds": 0.0, "val_kl": 2.0}, {"seconds": 10.0, "val_kl": 1.0}, {"seconds": 30.0, "val_kl": 0.5}]
    assert ttq.seconds_to(curve, 1.0) == 10.0
    assert ttq.seconds_to(curve, 0.75) == 30.0  # between two saves the run has only the earlier student
    assert ttq.seconds_to(curve, 2.5) == 0.0  # the student at the start already there
    assert ttq.seconds_to(curve, 0.4) is None
    bumpy = [{"seconds": 0.0, "val_kl": 2.0}, {"seconds": 10.0, "val_kl": 1.4}, {"seconds": 20.0, "val_kl": 3.0}]
    assert ttq.seconds_to(bumpy, 1.5) == 10.0  # the first student there, whatever came after


def test_mean_curve_and_reference_speedup():
    def run(kl_end: float, seconds: float, steps: int) -> dict:
        curve = [{"seconds": 0.0, "val_kl": 2.0, "val_kl_rev": 2.0, "val_ce": 3.0},
                 {"seconds": seconds, "val_kl": kl_end, "val_kl_rev": kl_end, "val_ce": 2.0}]
        return {"curve": curve, "steps": steps, "peak_rss_mb": 100.0 * steps}

    runs = {"trl_gkd_fwd": [run(1.0, 100.0, 10), run(1.2, 110.0, 12)], "kdkit_cache": [run(0.2, 100.0, 50)]}
    s = ttq.summarize(runs, {"cache_seconds": 7.0})
    trl, kd = s["rows"]
    assert trl["val_kl"] == pytest.approx(1.1) and trl["seconds"] == pytest.approx(105.0) and trl["steps"] == 11
    assert trl["peak_rss_mb"] == 1200.0 and trl["target_kl"] == pytest.approx(1.1)
    # kdkit's first saved student (100 s) is at 0.2, below TRL's final 1.1, whose final student was ready at 105 s
    assert kd["seconds_to_target"] == 100.0 and kd["speedup"] == pytest.approx(1.05)
    text = ttq.table(s)
    assert "| kdkit_cache | 1 | 50 | 2.00 | 0.200 (0.200) |" in text and "100 (+7 capture) | 1.05× |" in text


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_marks_save_past_each_mark_and_stop_at_the_budget(tmp_path):
    marks = ttq.Marks(tmp_path, budget=10.0, n=2)
    marks.model = _tiny_model()
    marks.after_step(None)  # at once: before the first mark, nothing saved
    assert marks.steps == 1 and marks.saved == [] and marks.todo == [5.0, 10.0]
    marks.t0 = time.perf_counter() - 6.0  # the clock past the first mark
    marks.after_step(None)
    assert [p["step"] for p in marks.saved] == [2] and marks.saved[0]["seconds"] >= 6.0
    assert (tmp_path / "mark-00" / "model.safetensors").is_file() and marks.todo == [10.0]
    assert marks.elapsed() < 10.0  # the save was taken off the clock
    marks.t0 = time.perf_counter() - 25.0  # one step past the budget
    with pytest.raises(ttq.Budget):
        marks.after_step(None)
    assert [p["dir"] for p in marks.saved] == ["mark-00", "mark-01"] and marks.todo == []


def test_a_kdkit_arm_stops_at_its_budget_through_the_optimizer_hook(tmp_path):
    """kdkit's own trainer under the benchmark's clock: every step ends past a budget of a millisecond, so the
    first one saves the only mark and stops the run; run.json records it."""
    from kdkit.demo.assets_build import STUDENT_SHAPE, fresh_model_dir
    from kdkit.demo.run import TEACHER_DIR
    from kdkit.demo.world import make_world

    rows = [{"messages": [{"role": "user", "content": t["prompt"]},
                          {"role": "assistant", "content": t["canonical_solution"]}]} for t in make_world(0).train[:16]]
    (tmp_path / "data").mkdir()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = {"teacher": str(TEACHER_DIR), "student": str(fresh_model_dir(tmp_path / "student", STUDENT_SHAPE, seed=1)),
         "train": str(train), "val": str(train), "cache": None, "cache_seconds": 0.0}
    (tmp_path / "data" / "inputs.json").write_text(json.dumps(d))
    args = argparse.Namespace(out=tmp_path, one="kdkit_live", seed=0, budget=0.001, marks=1, lr=1e-3, new_tokens=8,
                              url=None)
    ttq.one(args)
    record = json.loads((tmp_path / "runs" / "kdkit_live_s0" / "run.json").read_text())
    assert record["steps"] == 1 and [p["step"] for p in record["marks"]] == [1] and record["peak_rss_mb"] > 0
    curve = ttq.evaluate(tmp_path / "runs" / "kdkit_live_s0", d)
    assert [p["step"] for p in curve] == [0, 1]
    assert curve[1]["val_kl"] < curve[0]["val_kl"]  # one step of KD at lr 1e-3 on the rows scored brings it closer


def test_an_arm_directory_with_files_it_did_not_write_is_not_removed(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "inputs.json").write_text("{}")
    mine = tmp_path / "runs" / "kdkit_live_s0"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("a user's file")
    args = argparse.Namespace(out=tmp_path, one="kdkit_live", seed=0, budget=1.0, marks=1, lr=1e-3, new_tokens=8,
                              url=None)
    with pytest.raises(SystemExit, match="notes.txt, which this benchmark did not write"):
        ttq.one(args)
    assert (mine / "notes.txt").read_text() == "a user's file"
