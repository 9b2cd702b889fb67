("``kdkit precompute``, ``generate``, ``teacher check`` and ``cache``: the teacher captured once, its completions, "
 "its served copy checked.")

from __future__ import annotations

from pathlib import Path as _P
from typing import Any

import typer
from rich.table import Table

from kdkit.cli.group import _end_process_group, _load_config, app, cache_app, console, err_console, fail, teacher_app


@app.command("precompute")
def precompute_cmd(
    teacher: str = typer.Option(None, help=("Teacher: a local Hugging Face model directory (safetensors) with its "
                                            "tokenizer. With --config: defaults to the config's teacher.model.")),
    data: str = typer.Option(None, help=("Training data JSONL: prompt/completion, messages or text rows. With "
                                         "--config: the config's data.train.")),
    out: str = typer.Option(None, help=("Cache directory to create, resume, or confirm. With --config: defaults to "
                                        "the config's teacher.cache.")),
    config: str = typer.Option(None, help=("Training config YAML: data, max_length, truncation and the temperature "
                                           "(objective.kd.temperature) are read from it, so capture and loss "
                                           "settings are declared once; giving them again here is refused unless "
                                           "equal.")),
    top_k: int = typer.Option(64, help="Teacher log-probs kept per position (the K largest)."),
    temperature: float = typer.Option(None, help=("Capture temperature: the teacher softmax is taken at logits / T "
                                                  "(default 1.0).")),
    batch_size: int = typer.Option(8, help="Rows per teacher forward (length-sorted batches)."),
    max_length: int = typer.Option(None, help="Truncate rows to this many tokens (truncations are counted; default 1024)."),
    truncation: str = typer.Option(None, help=("Rows over --max-length: 'left' (default) drops the oldest tokens "
                                               "(keeps the completion; a leading BOS stays), 'right' drops the end. "
                                               "Must match the training config's data.truncation.")),
    dtype: str = typer.Option("float32", help="Teacher compute dtype: float32, bfloat16 or float16."),
    logprob_dtype: str = typer.Option("float16", help=("Stored log-probs: float16 (default), float32, or uint8 — "
                                                       "lossy, opt-in: 8 bits per log-prob on a per-position scale "
                                                       "(about 60 fewer bytes per token at K = 64; its KL error is "
                                                       "in docs/benchmarks.md).")),
    shard_rows: int = typer.Option(256, help="Rows per shard (the unit of resumption)."),
    on_empty: str = typer.Option(None, help="Rows with no target token: 'skip' (default; reported) or 'error'."),
    student_tokenizer: str = typer.Option(None, help=("A student whose tokenizer differs from the teacher's (its "
                                                      "model directory): the rows are read with it and the "
                                                      "teacher's top-K is stored at the positions aligned by "
                                                      "characters (for objective.kd.cross_tokenizer). With "
                                                      "--config: the config's student.path when its cross_tokenizer "
                                                      "is set.")),
    teacher_url: list[str] = typer.Option(None, metavar="URL", help=("A teacher served by vLLM (http://HOST:PORT or "
                                                      "http://HOST:PORT/v1): its prompt log-probs are captured instead "
                                                      "of a local forward. --teacher is then the local directory of its "
                                                      "tokenizer; when it also holds the weights, they are "
                                                      "fingerprinted and `kdkit teacher check` runs on a few rows "
                                                      "first. Repeat it for several servers of the same teacher: each "
                                                      "answers one batch at a time, a server that stops answering is "
                                                      "left out, and the cache's bytes are those one server writes. "
                                                      "With --config: the config's teacher.url.")),
    served_model: str = typer.Option(None, help=("With --teacher-url: the model name the server must serve (its "
                                                 "--served-model-name; default: its only model).")),
    mixed_environments: bool = typer.Option(False, "--mixed-environments", help=("Accept shards written in another "
                                                                                 "compute environment (another CPU's "
                                                                                 "kernels, GPU, torch or transformers; a "
                                                                                 "resume or another rank elsewhere) "
                                                                                 "instead of refusing them; the manifest "
                                                                                 "then records each shard's environment.")),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    ("Run the teacher once over DATA and store its top-K log-probs, tail mass and statistics in OUT.\n"
     "\n"
     "The cache is content-addressed: OUT records a key of (teacher, tokenizer, data, K, T, max_length, dtypes). "
     "Rerunning with the same inputs in the same compute environment resumes a killed run (or does nothing when "
     "complete) and gives byte-identical shards; other inputs are refused with the differing field named, and "
     "shards from another environment (recorded in each shard and in the manifest) are refused naming both.")
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

    given = {"--teacher": teacher, "--data": data, "--out": out, "--temperature": temperature,
             "--max-length": max_length, "--truncation": truncation, "--on-empty": on_empty,
             "--student-tokenizer": student_tokenizer, "--teacher-url": _urls(teacher_url), "--served-model": served_model}
    v = _precompute_inputs(given, config) if config else {
        **given, "--temperature": 1.0 if temperature is None else temperature,
        "--max-length": max_length or 1024, "--truncation": truncation or "left", "--on-empty": on_empty or "skip"}
    missing = [k for k in ("--teacher", "--data", "--out") if not v[k]]
    if missing:
        fail(f"missing {', '.join(missing)} (or give --config with a training config that names them)")
    settings = PrecomputeSettings(top_k=top_k, temperature=v["--temperature"], batch_size=batch_size,
                                  max_length=v["--max-length"], dtype=dtype, logprob_dtype=logprob_dtype,
                                  shard_rows=shard_rows, on_empty=v["--on-empty"], truncation=v["--truncation"],
                                  student_tokenizer=v["--student-tokenizer"], teacher_url=v["--teacher-url"],
                                  served_model=v["--served-model"], mixed_environments=mixed_environments)
    try:
        precompute(v["--teacher"], v["--data"], v["--out"], settings, progress=progress, log=console.print)
    finally:
        _end_process_group()


def _urls(url: str | list[str] | None) -> str | tuple[str, ...] | None:
    """``--teacher-url`` given once or several times, or a config's ``teacher.url``: None, one URL, or a tuple."""
    if not url:
        return None
    return url if isinstance(url, str) else url[0] if len(url) == 1 else tuple(url)


def _precompute_inputs(given: dict[str, Any], config: str) -> dict[str, Any]:
    """precompute's inputs from a training config; an option also given on the command line must agree."""
    cfg = _load_config(config, [])
    t = cfg.teacher
    declared = {"--teacher": t.model if t is not None else None, "--data": cfg.data.train,
                "--out": t.cache if t is not None else None, "--temperature": cfg.objective.kd.temperature,
                "--max-length": cfg.data.max_length, "--truncation": cfg.data.truncation,
                "--on-empty": cfg.data.on_empty,
                "--student-tokenizer": cfg.student.path if cfg.objective.kd.cross_tokenizer != "none" else None,
                "--teacher-url": _urls(t.url) if t is not None else None,
                "--served-model": t.served_model if t is not None else None}
    fields = {"--teacher-url": "teacher.url", "--served-model": "teacher.served_model",
              "--teacher": "teacher.model", "--data": "data.train", "--out": "teacher.cache",
              "--temperature": "objective.kd.temperature", "--max-length": "data.max_length",
              "--truncation": "data.truncation", "--on-empty": "data.on_empty",
              "--student-tokenizer": "student.path"}
    for opt, value in given.items():
        if value is None:
            continue
        paths = ("--teacher", "--data", "--out", "--student-tokenizer")
        same = declared[opt] is None or (str(_P(value).resolve()) == declared[opt] if opt in paths
                                         else value == declared[opt])
        if not same:
            fail(f"{opt} {value!r} differs from {config}'s {fields[opt]} ({declared[opt]!r}); the cache must be "
                 f"captured as the run will use it — leave {opt} out or change the config")
    return {k: given[k] if given[k] is not None and declared[k] is None else declared[k] for k in given}


@app.command("generate")
def generate_cmd(
    model: str = typer.Option(..., help=("The teacher: a local Hugging Face model directory (safetensors) with its "
                                         "tokenizer.")),
    data: str = typer.Option(..., help=("Prompt rows (JSONL): {\"prompt\": ...} or {\"messages\": [...]}; a "
                                        "completion or final assistant turn already there is replaced; role, task "
                                        "and weight are kept.")),
    out: str = typer.Option(..., help=("Training rows to write (JSONL, same format as the input); resumed when "
                                       "rerun with the same inputs.")),
    max_new_tokens: int = typer.Option(256, help="The most tokens per completion (each stops at EOS)."),
    batch_size: int = typer.Option(8, help=("Prompts per generation batch (fixed batches in file order: the unit of "
                                            "resumption).")),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 (default) is greedy decoding."),
    top_p: float = typer.Option(None, help="Nucleus sampling (only with --temperature > 0; default 1.0)."),
    seed: int = typer.Option(None, help="Sampling seed (only with --temperature > 0; default 0)."),
    teacher_url: str = typer.Option(None, help=("A teacher served by vLLM (http://HOST:PORT or http://HOST:PORT/v1) "
                                                "writes the completions, from the same prompt token ids; --model is "
                                                "then the local directory of its tokenizer and chat template (its "
                                                "EOS ids from there too).")),
    served_model: str = typer.Option(None, help=("With --teacher-url: the served model's name, when the server "
                                                 "serves several.")),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    ("Sequence-level KD: write the teacher's completions of DATA's prompts as training rows for `kdkit train`.\n"
     "\n"
     "Greedy by default, with every generation setting explicit (nothing from the model's generation_config.json). "
     "The same model, prompts and settings give the same bytes; a killed run resumes at its last complete batch; a "
     "rerun with other inputs is refused naming the field (the inputs are in OUT.kdkit.json, with the served "
     "model's name under --teacher-url).")
    from kdkit.models.generation import GenerationSettings
    from kdkit.teacher.seqkd import generate_rows

    if temperature < 0:
        fail(f"--temperature must be >= 0, got {temperature}")
    if temperature == 0 and (top_p is not None or seed is not None):
        fail("--top-p and --seed only take effect with --temperature > 0 (greedy decoding has no randomness)")
    if batch_size < 1 or max_new_tokens < 1:
        fail("--batch-size and --max-new-tokens must be >= 1")
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=temperature > 0,
                                  temperature=temperature or 1.0, top_p=1.0 if top_p is None else top_p,
                                  seed=seed or 0)
    if served_model is not None and teacher_url is None:
        fail("--served-model names a model of --teacher-url's server; without --teacher-url it does nothing")
    from kdkit.teacher.served import Server

    server = Server(teacher_url, served_model) if teacher_url else None
    res = generate_rows(model, data, out, settings, progress=progress, log=console.print, server=server)
    console.print(f"{out}: {res['rows']} rows ({res['generated']} generated now)")


@teacher_app.command("check")
def teacher_check(
    teacher_url: list[str] = typer.Option(..., metavar="URL", help=("The served teacher (http://HOST:PORT or "
                                                                    "http://HOST:PORT/v1); repeat it to check each "
                                                                    "of several servers.")),
    teacher: str = typer.Option(..., help=("The local copy: a Hugging Face model directory (safetensors) with its "
                                           "tokenizer and chat template.")),
    data: str = typer.Option(..., help="Rows (JSONL) to compare on: prompt/completion, messages or text."),
    rows: int = typer.Option(8, min=1, help="Compare on the first N rows."),
    top_k: int = typer.Option(8, min=1, help="Log-probs compared per position (the server's top-K)."),
    served_model: str = typer.Option(None, help="The model name the server must serve (default: its only one)."),
    dtype: str = typer.Option("float32", help="The local copy's compute dtype (float32, bfloat16, float16)."),
    max_length: int = typer.Option(1024, min=2, help="Rows are cut to this many tokens."),
    tolerance: float = typer.Option(1e-3, help=("Largest |Δ log-prob| allowed (float32 on both sides agrees to about "
                                                "1e-5).")),
    min_top1: float = typer.Option(0.99, help=("Smallest share of positions whose server top-1 is the local argmax "
                                               "(ties within the tolerance count).")),
    json_out: str = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
) -> None:
    ("Is the served teacher the teacher you think it is? On the first N rows: the token ids of each row's text on "
     "both sides (the tokenizer), each chat row as each side's chat template renders it (the template), and the "
     "top-K log-probs at every position (max and mean |Δ|, top-1 agreement). Exit 1 beyond the tolerance, naming "
     "the first difference. Several --teacher-url: each server is checked; exit 1 when any differs.\n"
     "\n"
     "Example: kdkit teacher check --teacher-url http://127.0.0.1:8000 --teacher models/teacher --data rows.jsonl")
    from kdkit.teacher.parity import teacher_parity
    from kdkit.teacher.served import Server
    from kdkit.util.io import atomic_write_json

    reports = [teacher_parity(Server(url, served_model), teacher, data, rows, top_k, dtype, max_length, tolerance,
                              min_top1) for url in teacher_url]
    if json_out:
        atomic_write_json(_P(json_out), reports[0].as_dict() if len(reports) == 1 else [r.as_dict() for r in reports])
    for report in reports:
        console.print(report.summary(), highlight=False)
    if not all(r.passed for r in reports):
        raise typer.Exit(1)


def _environment_line(env: Any) -> str:
    if env is None:
        return "not recorded (a cache made before kdkit recorded it)"
    if env == "mixed":
        return "mixed: each shard's is in the manifest (precompute --mixed-environments)"
    return ", ".join(f"{k} {v}" for k, v in env.items() if not isinstance(v, dict))


@cache_app.command("info")
def cache_info(path: str = typer.Argument(..., help="Cache directory.")) -> None:
    """Summarise a cache: teacher, key, K, temperature, rows, tokens, bytes/token, capture statistics."""
    from kdkit.teacher.cache.reader import load_manifest

    m = load_manifest(path)
    c, st = m["components"], m["stats"]
    table = Table(title=f"teacher cache {path}", show_header=False)
    table.add_column("field", overflow="fold")
    table.add_column("value", overflow="fold")
    for k, v in [
        ("key", m["key"]), ("teacher", m["teacher"]["path"]), ("teacher sha256", m["teacher"]["sha256"]),
        ("tokenizer sha256", c["tokenizer"]), ("data sha256", c["data"]), ("vocab size", m["vocab_size"]),
        ("top-K", c["top_k"]), ("capture temperature", c["temperature"]), ("max_length", c["max_length"]),
        ("teacher dtype", c["dtype"]), ("encoding", ", ".join(f"{a}:{b}" for a, b in m["encoding"].items())),
        ("rows", m["rows"]), ("tokens", m["tokens"]), ("shards", len(m["shards"])), ("bytes", f"{m['bytes']:,}"),
        ("bytes/token", f"{m['bytes_per_token']:.1f} (target <= {4.25 * c['top_k'] + 16:.0f})"),
        ("tail mass mean / p50 / p95",
         f"{st['tail_mass_mean']:.4f} / {st['tail_mass_p50']:.4f} / {st['tail_mass_p95']:.4f}"),
        ("compute environment", _environment_line(m.get("environment"))),
        ("teacher entropy (mean, nats)", "n/a (a served teacher returns its top-K alone)"
         if st["teacher_entropy_mean"] is None else f"{st['teacher_entropy_mean']:.4f}"),
        *([("served by", f"{m['teacher']['served']['url']} ({m['teacher']['served']['model']}, vLLM "
                         f"{m['teacher']['served']['vllm_version']}, max logprobs "
                         f"{m['teacher']['served']['max_logprobs']})")] if "served" in m["teacher"] else []),
    ]:
        table.add_row(k, str(v))
    console.print(table)


@cache_app.command("diff")
def cache_diff(
    a: str = typer.Argument(..., help="A cache directory (the reference)."),
    b: str = typer.Argument(..., help="Another cache of the same rows."),
    tolerance: float = typer.Option(1e-3, min=0.0, help=("Largest |Δ log-prob| (nats) that counts as agreement; a "
                                                         "top-1 that differs by more is a difference too.")),
    json_out: str = typer.Option(None, "--json", help="Also write the comparison as JSON here."),
) -> None:
    ("Compare two caches of the same rows: the key fields and compute environments that differ, the positions whose "
     "top-K ids differ, max and mean |Δ log-prob|, bucket KL(A ‖ B) and top-1 agreement. Exit 1 when they differ "
     "beyond --tolerance (or are not of the same rows).\n"
     "\n"
     "Example: kdkit cache diff cache-avx512 cache-default --tolerance 0.01")
    from kdkit.teacher.cache.diff import diff_caches
    from kdkit.util.io import atomic_write_json

    d = diff_caches(a, b, tolerance)
    for line in d.summary():
        console.print(line, highlight=False)
    if json_out:
        atomic_write_json(json_out, d.as_dict())
    if not d.passed:
        raise typer.Exit(1)


@cache_app.command("verify")
def cache_verify(path: str = typer.Argument(..., help="Cache directory.")) -> None:
    """Re-hash every shard against the manifest; exit 1 naming each missing, extra, truncated or changed shard."""
    from kdkit.teacher.cache.reader import verify_cache

    problems = verify_cache(path)
    if problems:
        for p in problems:
            err_console.print(f"[bold red]bad shard:[/] {p}", highlight=False)
        raise typer.Exit(1)
    console.print(f"{path}: every shard matches the manifest")
