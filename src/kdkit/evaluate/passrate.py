"""Executable-task evaluation: generation, extraction, sandboxed verification, pass rates.

Task files are read by :mod:`kdkit.evaluate.tasks`. A completion passes when the sandbox's harness reports that
``check(entry_point)`` returned after ``prompt + completion`` and then ``test`` ran (:mod:`kdkit.evaluate.harness`);
an exit status is never a pass.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdkit.evaluate.extract import answer_end, extract_completion
from kdkit.evaluate.sandbox import Limits, Program, RunResult, run_programs
from kdkit.evaluate.tasks import Task, TaskError, load_completions, load_tasks, tasks_fingerprint
from kdkit.models.generation import GenerationSettings, explicit_generation_config, generate, render_prompts
from kdkit.util.progress import Ticker, bar_shown

# task files: kdkit.evaluate.tasks; generation: kdkit.models.generation; extraction: kdkit.evaluate.extract
# (re-exported here)
__all__ = ["GenerationSettings", "Task", "TaskError", "answer_end", "explicit_generation_config", "extract_completion",
           "generate", "load_completions", "load_tasks", "tasks_fingerprint"]

def program_for(task: Task, completion: str) -> Program:
    """The candidate (prompt + completion), then the task's test, then ``check(entry_point)`` by the harness."""
    return Program(f"{task.prompt}{completion}\n", task.test, task.entry_point)


# --------------------------------------------------------------------------- statistics


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n (0, 0 for n = 0)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def pass_cell(k: int, n: int, interval: tuple[float, float] | None = None) -> str:
    """``k/n [lo–hi%]``: a pass count with its 95% interval (Wilson's unless given), whole percents — or tenths
    where whole percents would show the two ends alike (0 of 1000: ``[0.0–0.4%]``, not ``[0–0%]``)."""
    lo, hi = interval if interval is not None else wilson_interval(k, n)
    digits = 1 if lo != hi and f"{100 * lo:.0f}" == f"{100 * hi:.0f}" else 0
    return f"{k}/{n} [{100 * lo:.{digits}f}–{100 * hi:.{digits}f}%]"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021): 1 − C(n−c, k)/C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# --------------------------------------------------------------------------- verification


@dataclass
class TaskResult:
    task_id: str
    passed: bool
    status: str
    stderr_tail: str
    duration_s: float
    sample: int = 0
    completion: str = ""
    reason: str = ""  # why it did not pass (the harness's words), "" for a pass


@dataclass
class EvalSummary:
    n_tasks: int
    n_passed: int
    pass_rate: float
    interval: tuple[float, float]
    pass_at_k: dict[str, float]
    statuses: dict[str, int]

    def line(self) -> str:
        lo, hi = self.interval
        return (f"{self.n_passed}/{self.n_tasks} passed ({100 * self.pass_rate:.1f}%, "
                f"95% Wilson interval {100 * lo:.1f}–{100 * hi:.1f}%)")


def verify(tasks: Sequence[Task], completions: dict[str, list[str]], *, limits: Limits = Limits(),
           workers: int | None = None, unsafe_no_isolation: bool = False,
           on_done: Callable[[int, RunResult], None] | None = None) -> list[TaskResult]:
    """Run every (task, completion sample) in the sandbox. A task with no completion fails with status 'error'."""
    jobs: list[tuple[Task, int, str]] = []
    for t in tasks:
        for s, c in enumerate(completions.get(t.task_id, [None])):  # type: ignore[list-item]
            jobs.append((t, s, c))
    runnable = [(i, j) for i, j in enumerate(jobs) if j[2] is not None]
    runs = run_programs([program_for(t, c) for _, (t, _, c) in runnable], limits=limits, workers=workers,
                        unsafe_no_isolation=unsafe_no_isolation, on_done=on_done)
    by_job = {i: r for (i, _), r in zip(runnable, runs, strict=True)}
    out = []
    for i, (t, s, c) in enumerate(jobs):
        r = by_job.get(i)
        if r is None:
            out.append(TaskResult(t.task_id, False, "error", "no completion for this task", 0.0, s, "",
                                  "no completion for this task"))
        else:
            out.append(TaskResult(t.task_id, r.passed, r.status, r.stderr_tail[-500:], round(r.duration_s, 3), s, c,
                                  r.reason))
    return out


def by_category(tasks: Sequence[Task], results: Sequence[TaskResult]) -> dict[str, dict[str, Any]]:
    """Pass counts (first sample) and Wilson intervals per task ``category``; empty when no task has one."""
    cat = {t.task_id: t.category for t in tasks}
    if not any(cat.values()):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.sample == 0:
            c = out.setdefault(cat[r.task_id] or "(none)", {"passed": 0, "tasks": 0})
            c["tasks"] += 1
            c["passed"] += int(r.passed)
    for c in out.values():
        c["interval"] = wilson_interval(c["passed"], c["tasks"])
    return dict(sorted(out.items()))


def summarise(results: Sequence[TaskResult], ks: Sequence[int] = (1,)) -> EvalSummary:
    per_task: dict[str, list[bool]] = {}
    statuses: dict[str, int] = {}
    for r in results:
        per_task.setdefault(r.task_id, []).append(r.passed)
        statuses[r.status] = statuses.get(r.status, 0) + 1
    n = len(per_task)
    # "passed" for a task = its first sample passed (greedy decoding has exactly one)
    k_pass = sum(1 for v in per_task.values() if v[0])
    pak = {}
    for k in ks:
        if all(len(v) >= k for v in per_task.values()) and n:
            pak[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in per_task.values()) / n
    return EvalSummary(n, k_pass, k_pass / n if n else 0.0, wilson_interval(k_pass, n), pak, statuses)


def write_results(path: str | Path, results: Sequence[TaskResult]) -> None:
    from kdkit.util.io import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in results).encode())


def _rate() -> Any:
    """A progress column: tasks per second."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.2f} tasks/s" if task.speed else "")

    return Rate()


def evaluate_model(model_dir: str | Path, tasks_path: str | Path, *, settings: GenerationSettings = GenerationSettings(),
                   limits: Limits = Limits(), workers: int | None = None, unsafe_no_isolation: bool = False,
                   progress: bool = True, model: Any = None, tokenizer: Any = None,
                   log: Callable[[str], None] | None = None, limit: int | None = None, dtype: str = "float32",
                   device: str | None = None, served: Any = None
                   ) -> tuple[list[TaskResult], EvalSummary, list[dict[str, Any]]]:
    """Generate → extract → verify for every task. Returns results, summary and raw generations. Without a
    terminal, ``log`` gets a progress line every twentieth of the tasks (verified, passed, rate, time left).
    ``served``: a :class:`kdkit.evaluate.served.ServedCandidate` writes the answers (no model is loaded here)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kdkit.evaluate.sandbox import check_isolation
    from kdkit.models.load import check_model_dir, load_causal_lm, load_tokenizer

    if model is None and served is None:
        check_model_dir(model_dir)  # a run directory is named for what it is before anything else
    tasks = load_tasks(tasks_path)[:limit]  # limit: the file's first tasks
    if not unsafe_no_isolation:
        check_isolation()  # fail before spending time on generation
    tokenizer = tokenizer or load_tokenizer(served.candidate if served is not None else model_dir)
    if served is None:
        model = model or load_causal_lm(model_dir, dtype)
        if device is not None:
            model.to(device)
    shown = bar_shown(progress)
    ticker = Ticker("eval", len(tasks) * settings.n_samples, "answers verified", log or (lambda m: None),
                    enabled=log is not None and not shown)
    verified = {"done": 0, "passed": 0}

    def on_done(i: int, r: TaskResult) -> None:
        bar.advance(v, 1)
        verified["done"] += 1
        verified["passed"] += int(r.passed)
        ticker.update(verified["done"], f"{verified['passed']} passed")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _rate(), TimeElapsedColumn(),
                  disable=not shown) as bar:
        g = bar.add_task("generate", total=len(tasks) * settings.n_samples)
        try:
            prompts = render_prompts(tokenizer, [t.prompt for t in tasks], settings)
        except ValueError as e:
            from kdkit.models.load import ModelError

            raise ModelError(f"{model_dir}: {e}") from None
        v = bar.add_task("verify", total=len(tasks) * settings.n_samples)
        # each batch is verified in the sandbox while the next one generates
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = []

            def submit(sample: int, lo: int, texts: list[str]) -> None:
                part = tasks[lo:lo + len(texts)]
                comps = {t.task_id: [extract_completion(t.prompt, x)] for t, x in zip(part, texts, strict=True)}
                pending.append((sample, lo, pool.submit(verify, part, comps, limits=limits, workers=workers,
                                                        unsafe_no_isolation=unsafe_no_isolation,
                                                        on_done=on_done)))

            kw = dict(on_batch=lambda n: bar.advance(g, n), stop=answer_end,
                      add_special_tokens=settings.prompt_style == "raw", on_texts=submit)
            if served is None:
                raw = generate(model, tokenizer, prompts, settings, **kw)
            else:
                from kdkit.evaluate.served import stop_ids

                raw = served.generate(tokenizer, prompts, settings, stop_ids=stop_ids(served.candidate, tokenizer), **kw)
            results = []
            for sample, lo, fut in pending:
                for j, r in enumerate(fut.result()):
                    r.sample = sample
                    results.append((lo + j, sample, r))
    results = [r for _, _, r in sorted(results, key=lambda x: (x[0], x[1]))]
    completions = {r.task_id: [] for r in results}
    for r in results:
        completions[r.task_id].append(r.completion)
    ks = [k for k in (1, 5, 10) if k <= settings.n_samples]
    generations = [{"task_id": t.task_id, "sample": s, "raw": r, "completion": completions[t.task_id][s]}
                   for t, rs in zip(tasks, raw, strict=True) for s, r in enumerate(rs)]
    return results, summarise(results, ks), generations


def evaluation_key(settings: GenerationSettings, timeout_s: float) -> str:
    """What an evaluation depends on besides the model and the tasks: every generation setting, the timeout."""
    return json.dumps({"generation": asdict(settings), "timeout_s": timeout_s}, sort_keys=True)


def write_eval_dir(out: str | Path, *, model: str, tasks: str, results: Sequence[TaskResult], summary: EvalSummary,
                   generations: list[dict[str, Any]], settings: GenerationSettings, timeout_s: float,
                   limit: int | None, dtype: str, categories: dict[str, Any], served: dict[str, Any] | None = None
                   ) -> None:
    """``kdkit eval --out``: generations.jsonl, results.jsonl and summary.json — the figures, every setting (and
    ``served``: the server that wrote the answers), and
    what :func:`read_eval_dir` (a gate reusing the evaluation) matches on: the model's and the tasks' sha256 and
    the evaluation key."""
    from kdkit.util.identity import path_identity
    from kdkit.util.io import atomic_write_bytes, atomic_write_json

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / "generations.jsonl", "".join(json.dumps(g, sort_keys=True) + "\n" for g in generations).encode())
    write_results(d / "results.jsonl", results)
    atomic_write_json(d / "summary.json", {**asdict(summary), "model": model, "tasks": tasks, "limit": limit,
                                           "dtype": dtype, "generation": asdict(settings), "by_category": categories,
                                           "model_sha256": path_identity(model)["sha256"],
                                           "tasks_sha256": tasks_fingerprint(tasks),
                                           "evaluation_key": evaluation_key(settings, timeout_s),
                                           **({"served": served} if served is not None else {})})


def read_eval_dir(d: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A ``kdkit eval --out`` directory's summary and per-task results (raises OSError or JSONDecodeError)."""
    d = Path(d)
    summary = json.loads((d / "summary.json").read_text())
    rows = [json.loads(x) for x in (d / "results.jsonl").read_text().splitlines() if x.strip()]
    return summary, rows
