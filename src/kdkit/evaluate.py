"""Executable-task evaluation: generation, extraction, sandboxed verification, pass rates.

Task files are read by :mod:`kdkit.tasks`. A completion passes when
``prompt + completion + test + check(entry_point)`` runs to the end in the sandbox.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdkit.sandbox import Limits, RunResult, run_programs
from kdkit.tasks import Task, TaskError, load_completions, load_tasks, tasks_fingerprint

__all__ = ["Task", "TaskError", "load_completions", "load_tasks", "tasks_fingerprint"]  # task files: kdkit.tasks

# --------------------------------------------------------------------------- extraction

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_completion(prompt: str, generation: str) -> str:
    """The part of a generation that continues the prompt's function body.

    Keeps every line while the body's indentation continues — blank lines inside the
    body included (the seeds' holdouts failed only because an extractor stopped at
    them) — and stops at the first non-blank line that is not indented (the next
    top-level statement: prose, ``if __name__``, another ``def``, a test). Markdown
    fences are stripped first; if the code restates the prompt's function (``def
    name(``), only the body after that line (and after a repeated docstring) is kept.
    """
    text = generation.replace("\r\n", "\n")
    fenced = _FENCE.findall(text)
    if fenced:
        text = fenced[0]
    name = _function_name(prompt)
    lines = text.split("\n")
    first = next((ln for ln in lines if ln.strip()), "")
    if name and (fenced or not first[:1].isspace()):
        for i, line in enumerate(lines):
            if re.match(rf"\s*(async\s+)?def\s+{re.escape(name)}\s*\(", line):
                lines = _drop_docstring(lines[i + 1:])
                break
    kept: list[str] = []
    for line in lines:
        if line.strip() == "":
            kept.append(line)
            continue
        if not line[0].isspace():
            break
        kept.append(line)
    while kept and kept[-1].strip() == "":
        kept.pop()
    return "\n".join(kept) + ("\n" if kept else "")


def _function_name(prompt: str) -> str | None:
    names = re.findall(r"^\s*(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(", prompt, re.M)
    return names[-1] if names else None


def _drop_docstring(lines: list[str]) -> list[str]:
    """Remove a docstring that opens the body (the prompt already has one)."""
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i == len(lines):
        return lines
    head = lines[i].strip()
    for q in ('"""', "'''"):
        if head.startswith(q):
            if head.count(q) >= 2 and len(head) > 3:
                return lines[i + 1:]
            for j in range(i + 1, len(lines)):
                if q in lines[j]:
                    return lines[j + 1:]
            return lines
    return lines


def program_for(task: Task, completion: str) -> str:
    return f"{task.prompt}{completion}\n\n{task.test}\n\ncheck({task.entry_point})\n"


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
            out.append(TaskResult(t.task_id, False, "error", "no completion for this task", 0.0, s, ""))
        else:
            out.append(TaskResult(t.task_id, r.passed, r.status, r.stderr_tail[-500:], round(r.duration_s, 3), s, c))
    return out


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
    from kdkit.io import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in results).encode())


# --------------------------------------------------------------------------- generation

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```")


@dataclass(frozen=True)
class GenerationSettings:
    """Every setting generation uses. Nothing is taken from the model's ``generation_config.json``:
    greedy means greedy (no repetition penalty, no forced tokens, no top-k/top-p), as the seeds' lever F."""

    max_new_tokens: int = 256
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (sampling only)
    repetition_penalty: float = 1.0
    n_samples: int = 1
    seed: int = 0


def explicit_generation_config(settings: GenerationSettings, model: Any, tokenizer: Any) -> Any:
    """A GenerationConfig built only from ``settings`` and the special-token ids (EOS, pad, BOS).

    transformers fills every unset field of a passed config from the model's own generation config,
    so the model's config is swapped for this one during generation (see :func:`generate`)."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    eos = getattr(own, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        eos[0] if isinstance(eos, list) else eos)
    kw: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample, "num_beams": 1,
                          "repetition_penalty": settings.repetition_penalty, "eos_token_id": eos, "pad_token_id": pad,
                          "bos_token_id": getattr(own, "bos_token_id", None)}
    if settings.do_sample:
        kw.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return GenerationConfig(**kw)


def _truncate_at_stop(text: str) -> str:
    cut = len(text)
    for s in STOP_SEQUENCES:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings = GenerationSettings(),
             on_batch: Callable[[int], None] | None = None) -> list[list[str]]:
    """Raw continuations of each prompt (``n_samples`` each). Greedy by default: deterministic.

    Batches are left-padded; generation stops early once every row has produced a
    stop sequence or EOS. The same model + prompts + settings give the same text.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = next(model.parameters()).device
    config = explicit_generation_config(settings, model, tokenizer)
    own_config = model.generation_config
    model.generation_config = config  # nothing of the model's own generation config may leak in
    prev_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[list[str]] = [[] for _ in prompts]

    class _AllStopped(StoppingCriteria):
        def __init__(self, start: int) -> None:
            self.start = start

        def __call__(self, input_ids, scores, **kw):  # noqa: ANN001
            texts = tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
            done = [any(s in t for s in STOP_SEQUENCES) for t in texts]
            if tokenizer.eos_token_id is not None:
                done = [d or bool((row == tokenizer.eos_token_id).any()) for d, row in
                        zip(done, input_ids[:, self.start:], strict=True)]
            return torch.tensor(done, device=input_ids.device)

    try:
        model.eval()
        for sample in range(settings.n_samples):
            if settings.do_sample:
                torch.manual_seed(settings.seed + sample)
            for lo in range(0, len(prompts), settings.batch_size):
                chunk = list(prompts[lo:lo + settings.batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
                start = enc["input_ids"].shape[1]
                with torch.no_grad():
                    gen = model.generate(**enc, generation_config=config,
                                         stopping_criteria=StoppingCriteriaList([_AllStopped(start)]))
                texts = tokenizer.batch_decode(gen[:, start:], skip_special_tokens=True)
                for j, t in enumerate(texts):
                    outs[lo + j].append(_truncate_at_stop(t))
                if on_batch is not None:
                    on_batch(len(chunk))
    finally:
        tokenizer.padding_side = prev_side
        model.generation_config = own_config
    return outs


def evaluate_model(model_dir: str | Path, tasks_path: str | Path, *, settings: GenerationSettings = GenerationSettings(),
                   limits: Limits = Limits(), workers: int | None = None, unsafe_no_isolation: bool = False,
                   progress: bool = True, model: Any = None, tokenizer: Any = None
                   ) -> tuple[list[TaskResult], EvalSummary, list[dict[str, Any]]]:
    """Generate → extract → verify for every task. Returns results, summary and raw generations."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kdkit.models import load_causal_lm, load_tokenizer
    from kdkit.sandbox import check_isolation

    tasks = load_tasks(tasks_path)
    if not unsafe_no_isolation:
        check_isolation()  # fail before spending time on generation
    tokenizer = tokenizer or load_tokenizer(model_dir)
    model = model or load_causal_lm(model_dir)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        g = bar.add_task("generate", total=len(tasks) * settings.n_samples)
        raw = generate(model, tokenizer, [t.prompt for t in tasks], settings, on_batch=lambda n: bar.advance(g, n))
        completions = {t.task_id: [extract_completion(t.prompt, r) for r in rs] for t, rs in zip(tasks, raw, strict=True)}
        v = bar.add_task("verify", total=sum(len(c) for c in completions.values()))
        results = verify(tasks, completions, limits=limits, workers=workers, unsafe_no_isolation=unsafe_no_isolation,
                         on_done=lambda i, r: bar.advance(v, 1))
    ks = [k for k in (1, 5, 10) if k <= settings.n_samples]
    generations = [{"task_id": t.task_id, "sample": s, "raw": r, "completion": completions[t.task_id][s]}
                   for t, rs in zip(tasks, raw, strict=True) for s, r in enumerate(rs)]
    return results, summarise(results, ks), generations
