"""Unattended runs say what they are doing: without a terminal, a progress line every twentieth of the work."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.util.progress import Ticker
from tests.helpers import save_model_dir, toy_rows, write_config, write_jsonl


def test_a_ticker_speaks_every_twentieth_and_at_the_end():
    lines: list[str] = []
    t = Ticker("train", 40, "steps", lines.append, min_interval_s=0)
    for step in range(1, 41):
        t.update(step, f"loss {1 / step:.2f}")
    assert len(lines) == 20 and lines[0].startswith("train: 2/40 steps (5%) · loss 0.50 · ")
    assert lines[-1].startswith("train: 40/40 steps (100%) · loss 0.03") and lines[-1].endswith("· done")
    assert all(re.search(r"elapsed \d:\d\d:\d\d", x) for x in lines) and "left ~" in lines[0]
    quiet: list[str] = []
    t = Ticker("train", 40, "steps", quiet.append, enabled=False)
    for step in range(1, 41):
        t.update(step)
    assert quiet == []
    resumed: list[str] = []
    t = Ticker("train", 7, "steps", resumed.append, done=3, min_interval_s=0)  # a resume counts on from its checkpoint
    for step in range(4, 8):
        t.update(step)
    assert [x.split(" · ")[0] for x in resumed] == [f"train: {s}/7 steps ({100 * s / 7:.0f}%)" for s in range(4, 8)]
    paced: list[str] = []
    t = Ticker("eval", 40, "tasks", paced.append, min_interval_s=3600)  # quick work: the first line and the last
    for done in range(1, 41):
        t.update(done)
    assert [x.split(" · ")[0] for x in paced] == ["eval: 2/40 tasks (5%)", "eval: 40/40 tasks (100%)"]


def test_train_without_a_terminal_logs_progress_lines(tmp_path):
    student = save_model_dir(tmp_path / "student", seed=2, hidden=16)
    cfg = write_config(tmp_path, {"student": {"path": str(student)},
                                  "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", toy_rows(8))), "max_length": 64},
                                  "objective": {"kd_weight": 0.0},
                                  "optim": {"lr": 5e-3, "micro_batch": 2, "max_steps": 4, "schedule": "constant"},
                                  "checkpoint": {"every": 0}})
    res = CliRunner().invoke(app, ["train", str(cfg), "--out", str(tmp_path / "run")])  # progress asked, no TTY
    assert res.exit_code == 0, res.output
    lines = [x for x in res.output.splitlines() if x.startswith("train: ")]
    assert lines[0].startswith("train: 1/4 steps (25%)") and lines[-1].startswith("train: 4/4 steps (100%)")
    assert re.search(r"· loss \d+\.\d{4} · \d+ tokens · ", lines[0]) and lines[-1].endswith("· done")
    import json

    import torch

    assert json.loads((tmp_path / "run" / "run.json").read_text())["threads"] == torch.get_num_threads()
