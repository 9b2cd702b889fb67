"""The tiny world: deterministic, self-consistent tasks; holdout disjoint from training."""

from __future__ import annotations

import shutil

import pytest

from kdkit.demo.world import make_world, write_world
from kdkit.evaluate import load_tasks, summarise, verify
from kdkit.sandbox import Limits


def test_world_is_deterministic_and_splits_are_disjoint():
    a, b = make_world(3, n_train=300), make_world(3, n_train=300)
    assert a == b
    assert make_world(4, n_train=300) != a
    docs = lambda ts: {t["prompt"].split("\n", 1)[1] for t in ts}  # noqa: E731
    assert not docs(a.train) & docs(a.holdout) and not docs(a.train) & docs(a.anchors)
    assert not docs(a.anchors) & docs(a.holdout)
    assert len(a.anchors) == 30 and len(a.holdout) == 40


def test_holdout_uses_operation_chains_never_trained_on():
    w = make_world(0)
    import re

    def chain(t):
        d = t["prompt"]
        return re.sub(r"\d+", "K", d.split('"""')[1]) if "integer x" in d else None

    train_chains = {chain(t) for t in w.train} - {None}
    hold = [chain(t) for t in w.holdout]
    assert all(h is not None for h in hold)
    assert not set(hold) & train_chains


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_canonical_solutions_pass_and_wrong_ones_fail(tmp_path):
    w = make_world(1, n_train=60)
    paths = write_world(w, tmp_path)
    for split in ("anchors", "holdout"):
        tasks = load_tasks(paths[split])
        ok = summarise(verify(tasks, {t.task_id: [t.canonical_solution] for t in tasks}, limits=Limits(timeout_s=10)))
        assert ok.n_passed == len(tasks)
        wrong = summarise(verify(tasks, {t.task_id: ["    return 0\n"] for t in tasks}, limits=Limits(timeout_s=10)))
        assert wrong.n_passed <= 2
