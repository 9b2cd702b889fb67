"""The tiny world: deterministic, self-consistent tasks; holdout disjoint from training."""

from __future__ import annotations

import re
import shutil

import pytest

from kdkit.demo.world import make_world, write_world
from kdkit.evaluate.passrate import extract_completion, load_tasks, summarise, verify
from kdkit.evaluate.sandbox import Limits


def _doc(t):
    return t["prompt"].split('"""')[1]


def test_world_is_deterministic_and_splits_are_disjoint():
    a, b = make_world(3), make_world(3)
    assert a == b
    assert make_world(4) != a
    docs = lambda ts: {_doc(t) for t in ts}  # noqa: E731
    assert not docs(a.train) & docs(a.holdout) and not docs(a.train) & docs(a.anchors)
    assert not docs(a.anchors) & docs(a.holdout)
    assert len(a.anchors) == 30 and len(a.holdout) == 40 and len(a.train) > 1000


def test_holdout_composes_steps_that_training_covers():
    w = make_world(0)
    train_text = " ".join(_doc(t) for t in w.train)
    for t in w.holdout:
        steps = re.findall(r"(?:x, |then )([a-z ]+?)(?=, then|\.)", _doc(t))
        assert len(steps) == 4  # three steps + "return it"
        assert all(s in train_text for s in steps)


def test_canonical_bodies_survive_extraction():
    w = make_world(0)
    for t in w.anchors + w.holdout:
        assert extract_completion(t["prompt"], t["canonical_solution"] + "\n\nprint('done')\n") == \
            t["canonical_solution"]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_canonical_solutions_pass_and_wrong_ones_fail(tmp_path):
    paths = write_world(make_world(1), tmp_path)
    for split in ("anchors", "holdout"):
        tasks = load_tasks(paths[split])
        ok = summarise(verify(tasks, {t.task_id: [t.canonical_solution] for t in tasks}, limits=Limits(timeout_s=10)))
        assert ok.n_passed == len(tasks)
        wrong = summarise(verify(tasks, {t.task_id: ["    return 0\n"] for t in tasks}, limits=Limits(timeout_s=10)))
        assert wrong.n_passed <= 2
