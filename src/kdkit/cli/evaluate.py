"""``kdkit verify`` and ``eval``: completions verified in the sandbox, pass counts with intervals."""

from __future__ import annotations

import typer
from rich.table import Table

from kdkit.cli.group import PROMPT_STYLE_HELP, UNSAFE_HELP, _print_reasons, _print_summary, _prompting, app, console, fail


@app.command("verify")
def verify_cmd(
    tasks: str = typer.Option(..., help=("Task file (HumanEval format: task_id, prompt, entry_point, test; .jsonl[.gz]), "
                                         "or a ready-made suite: humaneval (164 tasks), mbpp-test (500; $KDKIT_MBPP).")),
    completions: str = typer.Option(None, help="Completions JSONL: {task_id, completion} rows (several rows = samples)."),
    solutions: str = typer.Option(None, help="'canonical': verify the tasks' own canonical_solution (self-check)."),
    out: str = typer.Option(None, help="Write per-task results (JSONL) here."),
    timeout: float = typer.Option(10.0, help="Wall-clock seconds per program."),
    memory_mb: int = typer.Option(1024, help="Address-space limit per program, MiB."),
    workers: int = typer.Option(None, help="Programs run in parallel (default: CPU count)."),
    unsafe_no_isolation: bool = typer.Option(False, "--unsafe-no-isolation", help=UNSAFE_HELP),
) -> None:
    ("Run prompt + completion + test + check(entry_point) for every task in the sandbox; print the pass count and "
     "rate with a 95% Wilson interval; write per-task results (passed, status, stderr tail, duration).")
    from kdkit.evaluate.passrate import load_completions, load_tasks, summarise, verify, write_results
    from kdkit.evaluate.sandbox import Limits
    from kdkit.evaluate.tasks import resolve_tasks

    if (completions is None) == (solutions is None):
        fail("give exactly one of --completions FILE or --solutions canonical")
    if solutions is not None and solutions != "canonical":
        fail(f"--solutions {solutions!r}: the only value is 'canonical'")
    tasks = str(resolve_tasks(tasks))
    task_list = load_tasks(tasks)
    if completions:
        comps = load_completions(completions, task_list)
    else:
        missing = [t.task_id for t in task_list if t.canonical_solution is None]
        if missing:
            fail(f"{tasks}: tasks without canonical_solution: {', '.join(missing[:5])}")
        comps = {t.task_id: [t.canonical_solution] for t in task_list}
    results = verify(task_list, comps, limits=Limits(timeout_s=timeout, memory_mb=memory_mb), workers=workers,
                     unsafe_no_isolation=unsafe_no_isolation)
    if out:
        write_results(out, results)
    summary = summarise(results)
    _print_summary(summary, f"verify {tasks}")
    console.print(summary.line())


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="A Hugging Face model directory (safetensors) with its tokenizer."),
    tasks: str = typer.Option(None, help=("Task file (HumanEval format, .jsonl or .jsonl.gz) or a ready-made suite "
                                          "(humaneval: 164 tasks; mbpp-test: 500, from $KDKIT_MBPP): pass counts.")),
    drift_from: str = typer.Option(None, "--drift-from", help=(
        "The base model directory the candidate was trained from: KL(base‖cand) and KL(cand‖base) per target "
        "token of --rows, mean and p95, one forward of each model and no generation (with or without --tasks).")),
    rows: str = typer.Option(None, help=("Rows for --drift-from: any data file `kdkit train` reads (the training "
                                         "rows, or anchor prompts with production's answers).")),
    max_length: int = typer.Option(1024, min=2, help="--rows are tokenised as training does, cut to this length."),
    out: str = typer.Option(None, help="Directory for generations.jsonl, results.jsonl, summary.json (and drift.json)."),
    max_new_tokens: int = typer.Option(256, help="Generation budget per task."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch."),
    sample: bool = typer.Option(False, help=("Sample instead of greedy decoding (greedy is deterministic). Nothing "
                                             "is taken from the model's generation_config.json: every setting is "
                                             "one of these options, recorded in summary.json.")),
    temperature: float = typer.Option(None, help="Sampling temperature (only with --sample; default 0.8)."),
    top_p: float = typer.Option(None, help="Nucleus sampling mass (only with --sample; default 0.95)."),
    top_k: int = typer.Option(None, help="Sample among the k most likely tokens (only with --sample; default 0 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="Repetition penalty (1.0 = none, the default, also for greedy)."),
    n_samples: int = typer.Option(1, help="Samples per task (with --sample; pass@k is reported for k <= n)."),
    seed: int = typer.Option(0, help="Sampling seed (only with --sample)."),
    prompt_style: str = typer.Option("raw", help=PROMPT_STYLE_HELP),
    instruction: str = typer.Option(None, help=("The instruction of --prompt-style chat (default: complete the "
                                                "function, answer with it in one Python code block).")),
    system: str = typer.Option(None, help="A system message for --prompt-style chat (default: none)."),
    timeout: float = typer.Option(10.0, help="Wall-clock seconds per program in the sandbox."),
    workers: int = typer.Option(None, help="Programs verified in parallel."),
    unsafe_no_isolation: bool = typer.Option(False, "--unsafe-no-isolation", help=UNSAFE_HELP),
    limit: int = typer.Option(None, min=1, help="Evaluate only the file's first N tasks (recorded in summary.json)."),
    dtype: str = typer.Option("float32", help="The model's weights in memory: float32, bfloat16 or float16."),
    device: str = typer.Option(None, help=("Where the model runs: cpu, cuda, cuda:1, ... (default: cpu; the sandbox "
                                           "always runs on the CPU).")),
    server: str = typer.Option(None, help=(
        "A vLLM server's URL: it writes the answers (greedy; same prompts, stop rule, extraction and sandbox). MODEL "
        "may then be a LoRA run or adapter (loaded at run time under a fresh name, unloaded after), the served "
        "model, or another full model (loaded in place, the served weights loaded back after).")),
    served_model: str = typer.Option(None, help="With --server: the served base model's name, when it serves several."),
) -> None:
    ("Generate a completion for every task (greedy by default), extract the function body, verify it in the "
     "sandbox, and report pass count and rate with a 95% Wilson interval (and pass@k when sampling), and why the "
     "others did not pass (results.jsonl has each task's reason and stderr). With --drift-from BASE --rows FILE: "
     "how far the model's next-token distributions moved from the base's on those rows.")
    if (drift_from is None) != (rows is None):
        fail("--drift-from BASE and --rows FILE go together (the KL from the base is measured on rows)")
    if tasks is None and drift_from is None:
        fail("give --tasks FILE (pass counts), --drift-from BASE with --rows FILE (drift from the base), or both")
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    generating = (("--max-new-tokens", max_new_tokens != 256), ("--batch-size", batch_size != 8), ("--sample", sample),
                  ("--repetition-penalty", repetition_penalty != 1.0), ("--prompt-style", prompt_style != "raw"),
                  ("--instruction", instruction is not None), ("--system", system is not None),
                  ("--timeout", timeout != 10.0), ("--workers", workers is not None), ("--limit", limit is not None),
                  ("--unsafe-no-isolation", unsafe_no_isolation))
    if tasks is None and any(given for _, given in generating):
        fail(f"{', '.join(n for n, given in generating if given)} only take(s) effect with --tasks (drift generates "
             f"nothing)")
    if served_model is not None and server is None:
        fail("--served-model names a model of --server; without --server it does nothing")
    if server is not None and tasks is None:
        fail("--server writes the answers to --tasks; drift is measured here (give --tasks)")
    if drift_from is not None:
        _drift(model, drift_from, rows, max_length, out, dtype, device)
    elif max_length != 1024:
        fail("--max-length only takes effect with --drift-from and --rows")
    if tasks is not None:
        from kdkit.evaluate.tasks import resolve_tasks

        _eval_tasks(model, str(resolve_tasks(tasks)), out, max_new_tokens, batch_size, sample, temperature, top_p,
                    top_k, repetition_penalty, n_samples, seed, prompt_style, instruction, system, timeout, workers,
                    unsafe_no_isolation, limit, dtype, device, server, served_model)


def _drift(model: str, base: str, rows: str, max_length: int, out: str | None, dtype: str, device: str | None) -> None:
    from kdkit.evaluate.drift import drift, write_drift

    figures = drift(model, base, rows, max_length=max_length, dtype=dtype, device=device, log=console.print)
    t = Table(title=f"drift of {model} from {base} on {rows}")
    for c in ("", "mean", "p95"):
        t.add_column(c, overflow="fold")
    t.add_row("KL(base‖cand)", f"{figures.kl_base_cand_mean:.4g}", f"{figures.kl_base_cand_p95:.4g}")
    t.add_row("KL(cand‖base)", f"{figures.kl_cand_base_mean:.4g}", f"{figures.kl_cand_base_p95:.4g}")
    console.print(t)
    if out:
        console.print(f"wrote {write_drift(out, figures, model, base)}")
    console.print(figures.line())


def _eval_tasks(model: str, tasks: str, out: str | None, max_new_tokens: int, batch_size: int, sample: bool,
                temperature: float | None, top_p: float | None, top_k: int | None, repetition_penalty: float,
                n_samples: int, seed: int, prompt_style: str, instruction: str | None, system: str | None,
                timeout: float, workers: int | None, unsafe_no_isolation: bool, limit: int | None, dtype: str,
                device: str | None, server: str | None, served_model: str | None) -> None:
    from kdkit.evaluate.passrate import GenerationSettings, by_category, evaluate_model, load_tasks, write_eval_dir
    from kdkit.evaluate.sandbox import Limits

    if not sample:
        unused = [name for name, v in (("--temperature", temperature), ("--top-p", top_p), ("--top-k", top_k),
                                       ("--seed", seed or None), ("--n-samples", n_samples if n_samples != 1 else None))
                  if v is not None]
        if unused:
            fail(f"{', '.join(unused)} only take(s) effect with --sample (greedy decoding has no randomness)")
    sampling = {"temperature": 0.8 if temperature is None else temperature, "top_p": 0.95 if top_p is None else top_p,
                "top_k": top_k or 0} if sample else {}
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=sample,
                                  repetition_penalty=repetition_penalty, n_samples=n_samples, seed=seed, **sampling,
                                  **_prompting(prompt_style, instruction, system))
    kw = dict(settings=settings, limits=Limits(timeout_s=timeout), workers=workers,
              unsafe_no_isolation=unsafe_no_isolation, log=console.print, limit=limit, dtype=dtype, device=device)
    served = None
    if server is None:
        results, summary, gens = evaluate_model(model, tasks, **kw)
    else:
        from kdkit.evaluate.served import ServedCandidate, check_settings

        check_settings(settings)  # before the server is touched
        with ServedCandidate.open(server, model, served_model) as sc:
            console.print(f"answers written by {sc.server.url} ({sc.describe()})")
            results, summary, gens = evaluate_model(model, tasks, served=sc, **kw)
            served = {"url": sc.server.url, "how": sc.how, "base": sc.base,
                      "vllm_version": sc.server.info().get("vllm_version")}
            model = str(sc.candidate)  # what the answers are of: the adapter, not a run's checkpoints
    categories = by_category(load_tasks(tasks)[:limit], results)
    if out:
        write_eval_dir(out, model=model, tasks=tasks, results=results, summary=summary, generations=gens,
                       settings=settings, timeout_s=timeout, limit=limit, dtype=dtype, categories=categories,
                       served=served)
    _print_summary(summary, f"eval {model} on {tasks}" + (f" (first {limit} tasks)" if limit else ""))
    _print_reasons(results)
    if categories:
        t = Table(title="per category")
        for c in ("category", "passed", "95% Wilson interval"):
            t.add_column(c, overflow="fold")
        for name, c in categories.items():
            t.add_row(name, f"{c['passed']}/{c['tasks']}", f"{100 * c['interval'][0]:.1f}–{100 * c['interval'][1]:.1f}%")
        console.print(t)
    console.print(summary.line())
