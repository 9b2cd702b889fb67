"""The ``kdkit`` command. Thin: parses arguments, calls the modules, prints."""

from __future__ import annotations

import os
import warnings
from pathlib import Path as _P
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup, TyperOption

from kdkit import __version__
from kdkit.loss.divergences import AGGREGATIONS, KINDS, TAIL_POLICIES
from kdkit.util.errors import KdkitError


class _Group(TyperGroup):
    """Every :class:`KdkitError` a command lets through is printed once, as a message, with the error's
    exit code (2: a bad input or option; 1: work that failed on the way)."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201
        from kdkit.util.io import storage_error

        try:
            return super().invoke(ctx)
        except KdkitError as e:
            if e.same_on_every_rank and int(os.environ.get("RANK", "0")) != 0:
                raise typer.Exit(e.exit_code) from None  # rank 0 says it, once for the run
            fail(str(e), code=e.exit_code)
        except Exception as e:  # a full disk or a read-only directory anywhere a command writes: one line
            mapped = storage_error(e, "the output directory")
            if mapped is None:
                raise
            fail(str(mapped), code=mapped.exit_code)


def _flag_type(self, ctx):  # noqa: ANN001, ANN202
    """A flag takes no value: its help row shows no `<bool>` type."""
    return None if getattr(self, "is_flag", False) else _option_type(self, ctx)


_option_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_type


app = typer.Typer(
    name="kdkit",
    cls=_Group,
    help="Distil language models and fine-tune them on a KL leash, with the evidence to decide what ships.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
diag_app = typer.Typer(help="Diagnostics that explain kdkit's conventions with numbers from the library.",
                       no_args_is_help=True)
app.add_typer(diag_app, name="diag")
registry_app = typer.Typer(help="The workspace registry: packs, production pointer, evaluations, gate decisions.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")
cache_app = typer.Typer(help="Inspect and verify a teacher cache made by `kdkit precompute`.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
teacher_app = typer.Typer(help="Check a teacher served by vLLM against its local copy.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
config_app = typer.Typer(help="The training config's fields, defaults and schema, generated from its models.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("defaults")
def config_defaults_cmd() -> None:
    """Print a complete, commented YAML of every training-config field at its default (sections that are off until written are commented out; required fields say <required>): kdkit config defaults > run.yaml."""
    from kdkit.config.reference import defaults_yaml

    typer.echo(defaults_yaml(), nl=False)


@config_app.command("schema")
def config_schema_cmd() -> None:
    """Print the training config's JSON Schema (for editors and validators: yaml-language-server, check-jsonschema)."""
    import json as _json

    from kdkit.config.reference import schema

    typer.echo(_json.dumps(schema(), indent=2, sort_keys=True))


@config_app.command("reference")
def config_reference_cmd() -> None:
    """Print the Markdown table of every field (type, default, what it does): README's config reference."""
    from kdkit.config.reference import reference_table

    typer.echo(reference_table(), nl=False)

# Deprecation notices between transformers and peft are for their developers, not for kdkit's users.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")

# messages wrap in the terminal, never mid-path in a pipe; a table written to a pipe or a file is laid out 160
# columns wide (COLUMNS if wider) instead of rich's 80, so that its cells are not folded mid-word
_PIPE_WIDTH = None if os.isatty(1) else max(160, int(os.environ.get("COLUMNS", "0") or 0))
console = Console(soft_wrap=True, width=_PIPE_WIDTH)
err_console = Console(stderr=True, soft_wrap=True)  # messages are never cut or hard-wrapped mid-path

KIND_HELP = f"Divergence kind, one of: {', '.join(KINDS)}."
AGG_HELP = f"Aggregation over positions, one of: {', '.join(AGGREGATIONS)}."


def fail(message: str, code: int = 2) -> None:
    """Print an error on stderr and exit non-zero (no traceback: the message names what is wrong)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        console.print(f"kdkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """kdkit: capture a teacher once, train a student on CE + KD + a KL barrier, evaluate it in a sandbox, gate it against production and sweep a parameter as a ladder of such runs."""


@diag_app.command("kinds")
def diag_kinds() -> None:
    """List the registered divergence kinds, aggregations and top-K tail policies."""
    table = Table(title="kdkit registries")
    table.add_column("registry", overflow="fold")
    table.add_column("names", overflow="fold")
    table.add_row("divergence kinds", ", ".join(KINDS))
    table.add_row("aggregations", ", ".join(AGGREGATIONS))
    table.add_row("tail policies", ", ".join(TAIL_POLICIES))
    console.print(table)


@diag_app.command("kl-agg")
def diag_kl_agg(
    tau: float = typer.Option(0.5, help="Hinge threshold τ: does relu(aggregate − τ) fire?"),
    kind: str = typer.Option("kl_rev", help=KIND_HELP),
    seed: int = typer.Option(0, help="Seed of the synthetic reference logits."),
) -> None:
    """Why the KL barrier should aggregate by rmse/p95/max, not mean (the seeds' synthetic case).

    A coherent student shifts a little mass at every one of 60 positions; an incoherent one spikes on an improbable token at 4 positions. Prints each aggregate of the per-position divergence to the reference, the separation ratio incoherent/coherent, and whether the hinge τ fires."""
    from kdkit.loss.diag import DIAG_AGGREGATIONS, kl_agg_demo

    if kind not in KINDS:
        fail(f"--kind {kind!r} is not a divergence kind; valid: {', '.join(KINDS)}")
    res = kl_agg_demo(kind=kind, tau=tau, seed=seed)
    table = Table(title=f"per-position {kind}(student, reference) over 60 positions, τ = {tau}")
    table.add_column("student", overflow="fold")
    for h in DIAG_AGGREGATIONS:
        table.add_column(h, justify="right", overflow="fold")
    for name in ("coherent", "incoherent"):
        table.add_row(name, *[
            f"{res.values[name][h]:.3f}" + (" [red]fires[/]" if res.fires[name][h] else "") for h in DIAG_AGGREGATIONS
        ])
    table.add_row("separation (incoherent / coherent)", *[f"{res.ratio[h]:.1f}x" for h in DIAG_AGGREGATIONS])
    console.print(table)
    blind = [h for h in DIAG_AGGREGATIONS if not res.fires["incoherent"][h]]
    console.print(
        f"With τ = {tau}, the barrier misses the incoherent student under: {', '.join(blind) or 'none'}; "
        f"fires under: {', '.join(h for h in DIAG_AGGREGATIONS if res.fires['incoherent'][h]) or 'none'}."
    )


@app.command("precompute")
def precompute_cmd(
    teacher: str = typer.Option(None, help="Teacher: a local Hugging Face model directory (safetensors) with its tokenizer. With --config: defaults to the config's teacher.model."),
    data: str = typer.Option(None, help="Training data JSONL: prompt/completion, messages or text rows. With --config: the config's data.train."),
    out: str = typer.Option(None, help="Cache directory to create, resume, or confirm. With --config: defaults to the config's teacher.cache."),
    config: str = typer.Option(None, help="Training config YAML: data, max_length, truncation and the temperature (objective.kd.temperature) are read from it, so capture and loss settings are declared once; giving them again here is refused unless equal."),
    top_k: int = typer.Option(64, help="Teacher log-probs kept per position (the K largest)."),
    temperature: float = typer.Option(None, help="Capture temperature: the teacher softmax is taken at logits / T (default 1.0)."),
    batch_size: int = typer.Option(8, help="Rows per teacher forward (length-sorted batches)."),
    max_length: int = typer.Option(None, help="Truncate rows to this many tokens (truncations are counted; default 1024)."),
    truncation: str = typer.Option(None, help="Rows over --max-length: 'left' (default) drops the oldest tokens (keeps the completion; a leading BOS stays), 'right' drops the end. Must match the training config's data.truncation."),
    dtype: str = typer.Option("float32", help="Teacher compute dtype: float32, bfloat16 or float16."),
    logprob_dtype: str = typer.Option("float16", help="Stored log-probs: float16 (default), float32, or uint8 — lossy, opt-in: 8 bits per log-prob on a per-position scale (about 60 fewer bytes per token at K = 64; its KL error is in docs/benchmarks.md)."),
    shard_rows: int = typer.Option(256, help="Rows per shard (the unit of resumption)."),
    on_empty: str = typer.Option(None, help="Rows with no target token: 'skip' (default; reported) or 'error'."),
    student_tokenizer: str = typer.Option(None, help="A student whose tokenizer differs from the teacher's (its model directory): the rows are read with it and the teacher's top-K is stored at the positions aligned by characters (for objective.kd.cross_tokenizer). With --config: the config's student.path when its cross_tokenizer is set."),
    teacher_url: str = typer.Option(None, help="A teacher served by vLLM (http://HOST:PORT or http://HOST:PORT/v1): its prompt log-probs are captured instead of a local forward. --teacher is then the local directory of its tokenizer; when it also holds the weights, they are fingerprinted and `kdkit teacher check` runs on a few rows first. With --config: the config's teacher.url."),
    served_model: str = typer.Option(None, help="With --teacher-url: the model name the server must serve (its --served-model-name; default: its only model)."),
    mixed_environments: bool = typer.Option(False, "--mixed-environments", help="Accept shards written in another compute environment (another CPU's kernels, GPU, torch or transformers; a resume or another rank elsewhere) instead of refusing them; the manifest then records each shard's environment."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run the teacher once over DATA and store its top-K log-probs, tail mass and statistics in OUT.

    The cache is content-addressed: OUT records a key of (teacher, tokenizer, data, K, T, max_length, dtypes). Rerunning with the same inputs in the same compute environment resumes a killed run (or does nothing when complete) and gives byte-identical shards; other inputs are refused with the differing field named, and shards from another environment (recorded in each shard and in the manifest) are refused naming both."""
    from kdkit.teacher.cache.precompute import PrecomputeSettings, precompute

    given = {"--teacher": teacher, "--data": data, "--out": out, "--temperature": temperature,
             "--max-length": max_length, "--truncation": truncation, "--on-empty": on_empty,
             "--student-tokenizer": student_tokenizer, "--teacher-url": teacher_url, "--served-model": served_model}
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


def _precompute_inputs(given: dict[str, Any], config: str) -> dict[str, Any]:
    """precompute's inputs from a training config; an option also given on the command line must agree."""
    cfg = _load_config(config, [])
    t = cfg.teacher
    declared = {"--teacher": t.model if t is not None else None, "--data": cfg.data.train,
                "--out": t.cache if t is not None else None, "--temperature": cfg.objective.kd.temperature,
                "--max-length": cfg.data.max_length, "--truncation": cfg.data.truncation,
                "--on-empty": cfg.data.on_empty,
                "--student-tokenizer": cfg.student.path if cfg.objective.kd.cross_tokenizer != "none" else None,
                "--teacher-url": t.url if t is not None else None,
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
    model: str = typer.Option(..., help="The teacher: a local Hugging Face model directory (safetensors) with its tokenizer."),
    data: str = typer.Option(..., help="Prompt rows (JSONL): {\"prompt\": ...} or {\"messages\": [...]}; a completion or final assistant turn already there is replaced; role, task and weight are kept."),
    out: str = typer.Option(..., help="Training rows to write (JSONL, same format as the input); resumed when rerun with the same inputs."),
    max_new_tokens: int = typer.Option(256, help="The most tokens per completion (each stops at EOS)."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch (fixed batches in file order: the unit of resumption)."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 (default) is greedy decoding."),
    top_p: float = typer.Option(None, help="Nucleus sampling (only with --temperature > 0; default 1.0)."),
    seed: int = typer.Option(None, help="Sampling seed (only with --temperature > 0; default 0)."),
    teacher_url: str = typer.Option(None, help="A teacher served by vLLM (http://HOST:PORT or http://HOST:PORT/v1) writes the completions, from the same prompt token ids; --model is then the local directory of its tokenizer and chat template (its EOS ids from there too)."),
    served_model: str = typer.Option(None, help="With --teacher-url: the served model's name, when the server serves several."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Sequence-level KD: write the teacher's completions of DATA's prompts as training rows for `kdkit train`.

    Greedy by default, with every generation setting explicit (nothing from the model's generation_config.json). The same model, prompts and settings give the same bytes; a killed run resumes at its last complete batch; a rerun with other inputs is refused naming the field (the inputs are in OUT.kdkit.json, with the served model's name under --teacher-url)."""
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
    teacher_url: str = typer.Option(..., help="The served teacher (http://HOST:PORT or http://HOST:PORT/v1)."),
    teacher: str = typer.Option(..., help="The local copy: a Hugging Face model directory (safetensors) with its tokenizer and chat template."),
    data: str = typer.Option(..., help="Rows (JSONL) to compare on: prompt/completion, messages or text."),
    rows: int = typer.Option(8, min=1, help="Compare on the first N rows."),
    top_k: int = typer.Option(8, min=1, help="Log-probs compared per position (the server's top-K)."),
    served_model: str = typer.Option(None, help="The model name the server must serve (default: its only one)."),
    dtype: str = typer.Option("float32", help="The local copy's compute dtype (float32, bfloat16, float16)."),
    max_length: int = typer.Option(1024, min=2, help="Rows are cut to this many tokens."),
    tolerance: float = typer.Option(1e-3, help="Largest |Δ log-prob| allowed (float32 on both sides agrees to about 1e-5)."),
    min_top1: float = typer.Option(0.99, help="Smallest share of positions whose server top-1 is the local argmax (ties within the tolerance count)."),
    json_out: str = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
) -> None:
    """Is the served teacher the teacher you think it is? On the first N rows: the token ids of each row's text on both sides (the tokenizer), each chat row as each side's chat template renders it (the template), and the top-K log-probs at every position (max and mean |Δ|, top-1 agreement). Exit 1 beyond the tolerance, naming the first difference.

    Example: kdkit teacher check --teacher-url http://127.0.0.1:8000 --teacher models/teacher --data rows.jsonl"""
    from kdkit.teacher.parity import teacher_parity
    from kdkit.teacher.served import Server
    from kdkit.util.io import atomic_write_json

    report = teacher_parity(Server(teacher_url, served_model), teacher, data, rows, top_k, dtype, max_length,
                            tolerance, min_top1)
    if json_out:
        atomic_write_json(_P(json_out), report.as_dict())
    console.print(report.summary(), highlight=False)
    if not report.passed:
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
    tolerance: float = typer.Option(1e-3, min=0.0, help="Largest |Δ log-prob| (nats) that counts as agreement; a top-1 that differs by more is a difference too."),
    json_out: str = typer.Option(None, "--json", help="Also write the comparison as JSON here."),
) -> None:
    """Compare two caches of the same rows: the key fields and compute environments that differ, the positions whose top-K ids differ, max and mean |Δ log-prob|, bucket KL(A ‖ B) and top-1 agreement. Exit 1 when they differ beyond --tolerance (or are not of the same rows).

    Example: kdkit cache diff cache-avx512 cache-default --tolerance 0.01"""
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


def _load_config(config: str, overrides: list[str]):
    from kdkit.config.schema import load_train_config

    return load_train_config(config, overrides)


@app.command("validate")
def validate_cmd(
    config: str = typer.Argument(..., help="Training config YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set objective.kd.beta=0.3 (repeatable)."),
) -> None:
    """Validate a training config without loading any model's weights: fields and ranges, duplicate keys, files, that a referenced cache matches the data, tokenizer, K and temperature (its shards re-hashed), that every role and task named occurs in the data, LoRA target modules and hidden-state layers against the models' structure, probe prompts and contrast pairs, and that no option would silently not take effect. `kdkit train` runs the same checks before it loads a model. Exits 2 naming the field."""
    from kdkit.models.load import check_model_dir, load_tokenizer
    from kdkit.train.preflight import load_rows, model_config, preflight

    cfg = _load_config(config, set_)
    try:  # whatever is wrong, the config is invalid: exit 2 naming it (train runs the same checks first)
        check_model_dir(cfg.student.path, "student.path:")
        tok = load_tokenizer(cfg.student.path)
        rows, val_rows, rep = load_rows(cfg, tok)
        preflight(cfg, rows, tok, int(model_config(cfg.student.path).get("vocab_size", len(tok))), verify=True,
                  val_rows=val_rows)
    except (KdkitError, OSError) as e:
        fail(str(e))
    console.print(f"{config}: valid — training data: {rep.summary(cfg.data.max_length)}")


@app.command("train")
def train_cmd(
    config: str = typer.Argument(..., help="Training config YAML (see `kdkit validate`)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set optim.lr=1e-4 (repeatable)."),
    out: str = typer.Option(None, help="Run directory (default: runs/<config name>)."),
    resume: bool = typer.Option(False, help="Continue from the newest complete checkpoint in the run directory."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train a student on CE + KD (cached or live teacher) + an optional KL barrier, on Accelerate.

    Writes config.yaml (resolved), run.json, metrics.jsonl, epochs.jsonl, checkpoints/ and final/ into the run directory (and probes.jsonl with a probes section: greedy generations and their coherence every N steps; early_stop stops on a coherence floor). objective.on_policy makes a share of the steps on-policy (the student writes, a live teacher scores). Several GPUs: `accelerate launch -m kdkit train ...`; several CPU processes: `torchrun --nproc_per_node N -m kdkit train ...`; sharded (FSDP2, GPUs or CPUs): `accelerate launch --config_file examples/accelerate/fsdp2.yaml -m kdkit train ...`. Ctrl-C saves a checkpoint; a non-finite loss stops with the step named."""
    from pathlib import Path as _P

    from kdkit.train import train

    cfg = _load_config(config, set_)
    run_dir = out or str(_P("runs") / _P(config).stem)
    from kdkit.util.io import storage

    try:
        with storage(run_dir):  # a full disk or a read-only --out: one line naming it; --resume continues
            res = train(cfg, run_dir, resume=resume, progress=progress, log=console.print)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        _end_process_group()
    if res.get("already_complete") or int(os.environ.get("RANK", "0")) != 0:  # one voice under torchrun
        return
    if res.get("early_stopped_at"):
        console.print(f"trained {res['early_stopped_at']} steps in {res['seconds']:.1f}s, stopped early on the coherence "
                      f"floor → {run_dir}/final holds step {res['steps']} (the last probe round at or above it)")
        return
    console.print(f"trained {res['steps']} steps in {res['seconds']:.1f}s → {run_dir}/final "
                  f"(max weight change {res['max_weight_change']:.3g})")


def _end_process_group() -> None:
    """Under a launcher, take the process group down before the interpreter exits: left to exit-time
    destruction, gloo's worker threads can abort a rank ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@app.command("merge")
def merge_cmd(
    run_dir: str = typer.Argument(..., help="A finished run directory (has final/)."),
    out: str = typer.Option(..., help="Directory for the merged model pack."),
    drop_adapter: list[str] = typer.Option([], "--drop-adapter", help="An extra adapter of the run to leave out of the pack (repeatable): `--drop-adapter quarantine` is a routed run's deployment, \"knob off\"; without it the quarantine is merged too (\"knob on\")."),
) -> None:
    """Write a full Hugging Face model directory from a run: LoRA adapters merged into the base, or the fully fine-tuned weights; loadable with AutoModelForCausalLM.from_pretrained."""
    from kdkit.train import merge

    path = merge(run_dir, out, drop=drop_adapter)
    console.print(f"merged {run_dir} → {path}")


barrier_app = typer.Typer(help="The KL barrier's threshold, from the reference's statistics.", no_args_is_help=True)
app.add_typer(barrier_app, name="barrier")


@barrier_app.command("tau")
def barrier_tau_cmd(
    config: str = typer.Argument(..., help="Training config YAML with objective.barrier and a reference."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set objective.barrier.aggregate=rmse (repeatable)."),
    steps: int = typer.Option(8, help="Measure the micro-batches of this many first training steps."),
    target_prob: float = typer.Option(0.5, help="The probability a student just inside τ gives every training target."),
    json_out: str = typer.Option(None, "--json", help="Also write the figures to this JSON file."),
) -> None:
    """Propose objective.barrier.tau from step 0: builds the run as `kdkit train` would (the same checks; nothing is written beside --json) and, over the first --steps steps' micro-batches, measures the barrier's divergence to the reference at step 0 and the least divergence a student needs to give every training target probability --target-prob (0 where the reference already does), aggregated as the barrier aggregates (mean, rmse, p95, max: the micro-batches' mean, as barrier_div_<how> is logged). The proposal is the second figure under the config's aggregate: a barrier at that τ stays inert while the student learns the data to that probability and fires when it moves further."""
    from kdkit.train.objective import BARRIER_VIEWS
    from kdkit.train.tau import propose_tau
    from kdkit.util.io import atomic_write_json

    cfg = _load_config(config, set_)
    fig = propose_tau(cfg, steps=steps, target_prob=target_prob)
    table = Table(title=f"barrier {fig['kind']} at T = {fig['temperature']:g}: {fig['micro_batches']} micro-batches, "
                        f"{fig['positions']:,} barrier positions")
    for col in ("aggregate", "at step 0", f"least move to p(target) ≥ {target_prob:g}", "micro-batch range"):
        table.add_column(col, justify="right" if col != "aggregate" else "left")
    for how in BARRIER_VIEWS:
        lo, hi = fig["range"][how]
        mark = " ←" if how == fig["aggregate"] else ""
        table.add_row(how + mark, f"{fig['at_step_0'][how]:.4g}", f"{fig['least_move'][how]:.4g}", f"{lo:.4g} – {hi:.4g}")
    console.print(table)
    tau, start = fig["proposed_tau"], fig["at_step_0"][fig["aggregate"]]
    console.print(f"proposed: --set objective.barrier.tau={tau:.4g}  ({fig['aggregate']}; the config has {fig['tau_now']:g})")
    if start > tau:
        console.print(f"note: at step 0 the student is already {start:.4g} from its reference, above the proposal: "
                      f"the barrier would fire from the first step")
    if json_out:
        atomic_write_json(json_out, fig)


student_app = typer.Typer(help="Make a student from its teacher.", no_args_is_help=True)
app.add_typer(student_app, name="student")


@student_app.command("init")
def student_init_cmd(
    from_: str = typer.Option(..., "--from", help="The teacher: a local Hugging Face model directory (safetensors)."),
    out: str = typer.Option(..., help="Directory for the student (absent, empty, or a student this command wrote)."),
    layers: int = typer.Option(None, help="Keep this many decoder layers, spread evenly over the depth (the first and the last included)."),
    keep: str = typer.Option(None, help="Keep exactly these decoder layers: comma-separated indices from 0, increasing (e.g. 0,5,11,17,23,29)."),
    dtype: str = typer.Option("float32", help="The student's weights: float32, bfloat16 or float16."),
) -> None:
    """Make a student by depth pruning its teacher: keep N of its decoder layers (spread evenly by default, or as listed), each with its weights, plus the teacher's embeddings, final norm and LM head; writes an ordinary Hugging Face directory with the teacher's tokenizer and chat template, and kdkit-student.json (which layers came from which teacher). Distillation then repairs what the cut broke: point student.path at it."""
    from kdkit.models.student import init_student, parse_keep

    info = init_student(from_, out, layers=layers, keep=parse_keep(keep) if keep is not None else None, dtype=dtype)
    console.print(f"wrote {out}: {len(info['kept_layers'])} of the teacher's {info['teacher_layers']} decoder layers "
                  f"({', '.join(map(str, info['kept_layers']))})")


def _print_reasons(results) -> None:
    """Why the tasks that did not pass did not: grouped by status and the harness's first words, with the
    tasks and one full reason each."""
    groups: dict[tuple[str, str], list] = {}
    for r in results:
        if not r.passed:
            why = r.reason or (r.stderr_tail.strip().splitlines() or ["(no reason given)"])[-1]
            groups.setdefault((r.status, why.split(":")[0].strip()[:60]), []).append(r)
    if not groups:
        return
    t = Table(title="why the others did not pass (results.jsonl: every task's reason and stderr)")
    for c in ("status", "why", "tasks", "for example"):
        t.add_column(c, overflow="fold")
    for (status, why), rs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        ids = ", ".join(r.task_id for r in rs[:4]) + (f", ... ({len(rs)})" if len(rs) > 4 else "")
        example = (rs[0].reason or rs[0].stderr_tail.strip()[-200:])[:200]
        t.add_row(status, why, ids, f"{rs[0].task_id}: {example}")
    console.print(t)


def _print_summary(summary, title: str) -> None:
    table = Table(title=title)
    for c in ("tasks", "passed", "pass rate", "95% Wilson interval", "statuses", *summary.pass_at_k):
        table.add_column(c, overflow="fold")
    lo, hi = summary.interval
    table.add_row(str(summary.n_tasks), str(summary.n_passed), f"{100 * summary.pass_rate:.1f}%",
                  f"{100 * lo:.1f}–{100 * hi:.1f}%", ", ".join(f"{k}: {v}" for k, v in sorted(summary.statuses.items())),
                  *[f"{v:.3f}" for v in summary.pass_at_k.values()])
    console.print(table)


PROMPT_STYLE_HELP = ("How the model is prompted: 'raw' gives the task's prompt as is (base models); 'chat' puts "
                     "--instruction and the prompt (in a code block) in a user turn of the model's own chat template, "
                     "after --system if given (instruct models). Extraction takes the function from the answer.")


def _prompting(prompt_style: str, instruction: str | None, system: str | None) -> dict:
    """GenerationSettings fields for the prompt options; instruction/system only take effect with chat."""
    from kdkit.models.generation import DEFAULT_INSTRUCTION, PROMPT_STYLES

    if prompt_style not in PROMPT_STYLES:
        fail(f"--prompt-style {prompt_style!r}; valid: {', '.join(PROMPT_STYLES)}")
    if prompt_style != "chat" and (instruction is not None or system is not None):
        fail("--instruction and --system only take effect with --prompt-style chat")
    return {"prompt_style": prompt_style, "instruction": instruction or DEFAULT_INSTRUCTION, "system": system}


UNSAFE_HELP = ("Run generated code WITHOUT namespaces isolation (rlimits and timeout only). Only for code you "
               "trust; the default refuses to run when bubblewrap is unavailable.")


@app.command("verify")
def verify_cmd(
    tasks: str = typer.Option(..., help="Task file (HumanEval format: task_id, prompt, entry_point, test; .jsonl[.gz])."),
    completions: str = typer.Option(None, help="Completions JSONL: {task_id, completion} rows (several rows = samples)."),
    solutions: str = typer.Option(None, help="'canonical': verify the tasks' own canonical_solution (self-check)."),
    out: str = typer.Option(None, help="Write per-task results (JSONL) here."),
    timeout: float = typer.Option(10.0, help="Wall-clock seconds per program."),
    memory_mb: int = typer.Option(1024, help="Address-space limit per program, MiB."),
    workers: int = typer.Option(None, help="Programs run in parallel (default: CPU count)."),
    unsafe_no_isolation: bool = typer.Option(False, "--unsafe-no-isolation", help=UNSAFE_HELP),
) -> None:
    """Run prompt + completion + test + check(entry_point) for every task in the sandbox; print the pass count and rate with a 95% Wilson interval; write per-task results (passed, status, stderr tail, duration)."""
    from kdkit.evaluate.passrate import load_completions, load_tasks, summarise, verify, write_results
    from kdkit.evaluate.sandbox import Limits

    if (completions is None) == (solutions is None):
        fail("give exactly one of --completions FILE or --solutions canonical")
    if solutions is not None and solutions != "canonical":
        fail(f"--solutions {solutions!r}: the only value is 'canonical'")
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
    tasks: str = typer.Option(..., help="Task file (HumanEval format, .jsonl or .jsonl.gz)."),
    out: str = typer.Option(None, help="Directory for generations.jsonl, results.jsonl and summary.json."),
    max_new_tokens: int = typer.Option(256, help="Generation budget per task."),
    batch_size: int = typer.Option(8, help="Prompts per generation batch."),
    sample: bool = typer.Option(False, help="Sample instead of greedy decoding (greedy is deterministic). Nothing is taken from the model's generation_config.json: every setting is one of these options, recorded in summary.json."),
    temperature: float = typer.Option(None, help="Sampling temperature (only with --sample; default 0.8)."),
    top_p: float = typer.Option(None, help="Nucleus sampling mass (only with --sample; default 0.95)."),
    top_k: int = typer.Option(None, help="Sample among the k most likely tokens (only with --sample; default 0 = off)."),
    repetition_penalty: float = typer.Option(1.0, help="Repetition penalty (1.0 = none, the default, also for greedy)."),
    n_samples: int = typer.Option(1, help="Samples per task (with --sample; pass@k is reported for k <= n)."),
    seed: int = typer.Option(0, help="Sampling seed (only with --sample)."),
    prompt_style: str = typer.Option("raw", help=PROMPT_STYLE_HELP),
    instruction: str = typer.Option(None, help="The instruction of --prompt-style chat (default: complete the function, answer with it in one Python code block)."),
    system: str = typer.Option(None, help="A system message for --prompt-style chat (default: none)."),
    timeout: float = typer.Option(10.0, help="Wall-clock seconds per program in the sandbox."),
    workers: int = typer.Option(None, help="Programs verified in parallel."),
    unsafe_no_isolation: bool = typer.Option(False, "--unsafe-no-isolation", help=UNSAFE_HELP),
    limit: int = typer.Option(None, min=1, help="Evaluate only the file's first N tasks (recorded in summary.json)."),
    dtype: str = typer.Option("float32", help="The model's weights in memory: float32, bfloat16 or float16."),
    device: str = typer.Option(None, help="Where the model runs: cpu, cuda, cuda:1, ... (default: cpu; the sandbox always runs on the CPU)."),
) -> None:
    """Generate a completion for every task (greedy by default), extract the function body, verify it in the sandbox, and report pass count and rate with a 95% Wilson interval (and pass@k when sampling), and why the others did not pass (results.jsonl has each task's reason and stderr)."""
    from pathlib import Path as _P

    from kdkit.evaluate.passrate import GenerationSettings, by_category, evaluate_model, load_tasks, write_results
    from kdkit.evaluate.sandbox import Limits
    from kdkit.util.io import atomic_write_bytes, atomic_write_json

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
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    results, summary, gens = evaluate_model(model, tasks, settings=settings, limits=Limits(timeout_s=timeout),
                                            workers=workers, unsafe_no_isolation=unsafe_no_isolation, log=console.print,
                                            limit=limit, dtype=dtype, device=device)
    categories = by_category(load_tasks(tasks)[:limit], results)
    if out:
        import json as _json
        from dataclasses import asdict

        d = _P(out)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "generations.jsonl", "".join(_json.dumps(g, sort_keys=True) + "\n" for g in gens).encode())
        write_results(d / "results.jsonl", results)
        from kdkit.decide.gate import evaluation_key
        from kdkit.evaluate.tasks import tasks_fingerprint
        from kdkit.util.identity import path_identity

        atomic_write_json(d / "summary.json", {**asdict(summary), "model": model, "tasks": tasks, "limit": limit,
                                               "dtype": dtype, "generation": asdict(settings),
                                               "by_category": categories,
                                               # what `kdkit gate --reuse-eval` matches on
                                               "model_sha256": path_identity(model)["sha256"],
                                               "tasks_sha256": tasks_fingerprint(tasks),
                                               "evaluation_key": evaluation_key(settings, timeout)})
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


WORKSPACE_HELP = "Workspace directory holding registry.sqlite and packs (env KDKIT_WORKSPACE; default .kdkit)."


def _registry(workspace: str | None, create: bool = False):
    """The workspace registry; only commands that add a pack (promote) create a missing workspace."""
    import os as _os

    from kdkit.decide.registry import Registry

    return Registry(workspace or _os.environ.get("KDKIT_WORKSPACE", ".kdkit"), create=create)


def _print_packs(reg) -> None:
    """A narrow table (fits 80 columns), then each pack's paths in full on its own line (never cut)."""
    prod = reg.production()
    console.print(f"packs in {reg.db_path}")
    t = Table()
    for c in ("id", "name", "status", "prod", "weights sha256", "parent"):
        t.add_column(c, overflow="fold")
    packs = reg.packs()
    for p in packs:
        t.add_row(str(p.id), p.name, p.status, "★" if prod and prod.id == p.id else "", p.weights_sha256[:12],
                  str(p.parent_id or ""))
    console.print(t)
    for p in packs:
        console.print(f"{p.id}: {p.path}" + (f" (from run {p.source_run})" if p.source_run else ""), highlight=False)


@registry_app.command("list")
def registry_list(workspace: str = typer.Option(None, help=WORKSPACE_HELP)) -> None:
    """List packs, their status (active/archived) and which one is production, then where each pack is stored."""
    _print_packs(_registry(workspace))


@registry_app.command("show")
def registry_show(
    pack: str = typer.Argument(None, help="Pack name or id (default: production)."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
) -> None:
    """Show one pack: its evaluations, the gate decisions about it, and the production history."""
    import json as _json

    from kdkit.decide.gate import format_tasks

    reg = _registry(workspace)
    p = reg.pack(pack) if pack else reg.production()
    if p is None:
        fail("no production pack yet")
    console.print(f"[bold]{p.name}[/] (id {p.id}, {p.status}) {p.path}\nweights sha256 {p.weights_sha256}")
    t = Table(title="evaluations")
    for c in ("id", "tasks", "passed", "95% interval"):
        t.add_column(c, overflow="fold")
    for e in reg.evaluations(p.id):
        t.add_row(str(e["id"]), e["tasks_path"], f"{e['n_passed']}/{e['n_tasks']}",
                  f"{100 * e['ci_low']:.1f}–{100 * e['ci_high']:.1f}%")
    console.print(t)
    g = Table(title="gate decisions")
    for c in ("id", "candidate", "baseline", "decision", "regressed", "fixed", "p", "reason"):
        g.add_column(c, overflow="fold")
    for row in reg.gates():
        if p.id in (row["candidate_id"], row["baseline_id"]):
            g.add_row(str(row["id"]), reg.pack(row["candidate_id"]).name, reg.pack(row["baseline_id"]).name,
                      row["decision"], format_tasks(_json.loads(row["regressed"])), format_tasks(_json.loads(row["fixed"])),
                      f"{row['p_value']:.3g}", row["reason"])
    console.print(g)
    h = Table(title="production history")
    for c in ("#", "pack", "reason"):
        h.add_column(c, overflow="fold")
    for row in reg.production_history():
        h.add_row(str(row["id"]), reg.pack(row["pack_id"]).name, row["reason"])
    console.print(h)


@registry_app.command("promote")
def registry_promote(
    pack: str = typer.Argument(..., help="A model directory (registered first) or a pack name/id."),
    name: str = typer.Option(None, help="Name for a newly registered pack (default: the directory name)."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
) -> None:
    """Make a pack production (registering a model directory first). The first production pack is usually the teacher or the untouched student."""
    from pathlib import Path as _P


    reg = _registry(workspace, create=True)
    p = reg.register(pack, name=name) if _P(pack).is_dir() else reg.pack(pack)
    reg.promote(p.id, reason="manual promote")
    console.print(f"production is now {p.name} (id {p.id})")


@registry_app.command("rollback")
def registry_rollback(workspace: str = typer.Option(None, help=WORKSPACE_HELP)) -> None:
    """Restore the previous production pack (recorded as a new production entry)."""

    reg = _registry(workspace)
    p = reg.rollback()
    console.print(f"production rolled back to {p.name} (id {p.id})")


@registry_app.command("archive")
def registry_archive(
    pack: str = typer.Argument(..., help="Pack name or id."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
) -> None:
    """Mark a pack archived (its files stay in the workspace; production cannot be archived)."""

    reg = _registry(workspace)
    p = reg.archive(pack)
    console.print(f"archived {p.name} (id {p.id})")


RULE_HELP = ("Gate rule as key=value pairs: max_regressions=N (anchor tasks the baseline passes that may fail; "
             "default 0), require_not_worse=true|false (pass count may not fall; default true), require_gain_p=P "
             "(the improvement rule: KEEP only when the pass count rises with an exact McNemar p below P, e.g. 0.05). "
             "The gate prints each suite's power: the fewest regressions or gains its size lets the test detect.")


SUITE_RULE_HELP = ("Rule of every --tasks file after the first: alpha=0.05 (default: the pass count may not fall "
                   "with an exact paired p below alpha; a drop the test calls noise is allowed) or margin=N (it may "
                   "fall by at most N tasks).")


GATE_EXIT = {"KEEP": 0, "REVERT": 1, "UNDECIDED": 3}


@app.command("gate")
def gate_cmd(
    candidate: str = typer.Argument(..., help="Candidate: a model directory (e.g. from `kdkit merge`) or a pack name."),
    tasks: list[str] = typer.Option(..., help="Task file (HumanEval or MBPP format). Repeat for several suites in one decision: the first is the anchors (--rule), the others are judged by --suite-rule."),
    against: str = typer.Option("production", help="Baseline: 'production' or a pack name/id."),
    rule: str = typer.Option(None, help=RULE_HELP),
    suite_rule: str = typer.Option(None, help=SUITE_RULE_HELP),
    max_new_tokens: int = typer.Option(256, help="Generation budget per task (greedy decoding)."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per generation batch (part of the evaluation's key: a stored evaluation is reused only at the same batch size)."),
    prompt_style: str = typer.Option("raw", help=PROMPT_STYLE_HELP),
    instruction: str = typer.Option(None, help="The instruction of --prompt-style chat."),
    system: str = typer.Option(None, help="A system message for --prompt-style chat."),
    timeout: float = typer.Option(10.0, help="Wall-clock seconds per program in the sandbox."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
    json_out: str = typer.Option(None, "--json", help="Also write the decision as JSON here."),
    unsafe_no_isolation: bool = typer.Option(False, "--unsafe-no-isolation", help=UNSAFE_HELP),
    progress: bool = typer.Option(True, help="Show progress bars while the packs are evaluated."),
    reuse_eval: list[str] = typer.Option([], "--reuse-eval", help="A `kdkit eval --out` directory to reuse instead of evaluating again, where its model files, task file and every generation setting (and --timeout) match the gate's; repeatable. The log says which it reused and why not the others."),
    promote_undecided: bool = typer.Option(False, "--promote-undecided", help="Promote a candidate the gate cannot decide (a suite on which the exact test cannot show a drop) as if it were kept; the registry records that this was asked for."),
) -> None:
    """Evaluate candidate and baseline on every task file (reusing stored evaluations), compare task by task, run the exact paired test per suite, decide once for all suites and record it: KEEP (promote), REVERT (archive), or UNDECIDED when a suite cannot show a drop (the baseline passes fewer tasks than the exact test needs to see one): nothing promoted or archived. Exit code 0 on KEEP, 1 on REVERT, 3 on UNDECIDED."""
    from kdkit.decide.gate import GateRule, SuiteRule, format_tasks, gate, power_line
    from kdkit.evaluate.passrate import GenerationSettings
    from kdkit.evaluate.sandbox import Limits
    from kdkit.util.io import atomic_write_json

    if suite_rule is not None and len(tasks) < 2:
        fail("--suite-rule only takes effect with a second --tasks file")
    reg = _registry(workspace)
    res = gate(reg, candidate, tasks, against=against, rule=GateRule.parse(rule),
               suite_rule=SuiteRule.parse(suite_rule),
               settings=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size,
                                           **_prompting(prompt_style, instruction, system)),
               limits=Limits(timeout_s=timeout), unsafe_no_isolation=unsafe_no_isolation, log=console.print,
               progress=progress, eval_dirs=[_P(d) for d in reuse_eval], promote_undecided=promote_undecided)
    for s in res.suites:
        t = Table(title=f"{_P(s['tasks']).name} ({'anchors' if s is res.suites[0] else 'suite'}): {s['decision']}")
        for c in ("model", "pass", "95% interval"):
            t.add_column(c, overflow="fold")
        for name, k, (lo, hi) in ((res.baseline, s["baseline_passed"], s["baseline_interval"]),
                                  (res.candidate, s["candidate_passed"], s["candidate_interval"])):
            t.add_row(name, f"{k}/{s['n_tasks']}", f"{100 * lo:.1f}–{100 * hi:.1f}%")
        console.print(t)
        console.print(f"regressed: {format_tasks(s['regressed'])}\nfixed: {format_tasks(s['fixed'])}\n"
                      f"exact McNemar p = {s['p_value']:.3g}\n{power_line(s['power'])}")
    console.print(f"[bold]{res.decision}[/]: {res.reason}")
    if json_out:
        atomic_write_json(json_out, res.to_json())
    raise typer.Exit(GATE_EXIT[res.decision])


@app.command("ladder")
def ladder_cmd(
    config: str = typer.Argument(..., help="Training config YAML (the rungs override it)."),
    vary: list[str] = typer.Option(..., help="key.sub=v1,v2,v3 — one rung per value (repeat for a grid)."),
    seeds: int = typer.Option(1, help="Run every rung with seeds 0..N-1 and add a table that aggregates each rung over its seeds (mean losses, pooled anchor pass with its Wilson interval, KEEP count). A seed s sets optim.seed = s and shifts data.shuffle_seed (and objective.on_policy.seed) by s, so the data order varies too; seeds that train identical weights are named. The same as --vary optim.seed=0,1,..."),
    tasks: list[str] = typer.Option(..., help="Task file for the gate; repeat for several suites (the first is the anchors, judged by --rule; the others by the gate's suite rule)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config field for every rung: --set optim.lr=1e-4 (repeatable; a rung's --vary value wins)."),
    out: str = typer.Option(None, help="Ladder directory (default: ladders/<config name>)."),
    rule: str = typer.Option(None, help=RULE_HELP),
    max_new_tokens: int = typer.Option(256, help="Generation budget per anchor task."),
    prompt_style: str = typer.Option("raw", help=PROMPT_STYLE_HELP),
    instruction: str = typer.Option(None, help="The instruction of --prompt-style chat."),
    system: str = typer.Option(None, help="A system message for --prompt-style chat."),
    timeout: float = typer.Option(10.0, help="Wall-clock seconds per program in the sandbox."),
    workspace: str = typer.Option(None, help=WORKSPACE_HELP),
    unsafe_no_isolation: bool = typer.Option(False, "--unsafe-no-isolation", help=UNSAFE_HELP),
    progress: bool = typer.Option(True, help="Show progress bars for each rung's training and evaluation."),
) -> None:
    """For each rung: train → merge → gate against the production at the ladder's start → KEEP/REVERT/UNDECIDED (as `kdkit gate`: an UNDECIDED rung promotes and archives nothing). A failed rung does not stop the ladder; a rerun skips finished rungs. Writes ladder.md, ladder.csv and ladder.png (anchor pass and losses against the varied value)."""
    from pathlib import Path as _P

    from kdkit.decide.gate import GateRule
    from kdkit.decide.ladder import parse_vary, run_ladder, seed_rows, table_rows
    from kdkit.evaluate.passrate import GenerationSettings
    from kdkit.evaluate.sandbox import Limits

    if seeds < 1:
        fail("--seeds must be >= 1")
    if seeds > 1:
        if any(v.split("=", 1)[0].strip() == "optim.seed" for v in vary):
            fail("--seeds and --vary optim.seed=... both set the seed axis; give one")
        vary = [*vary, "optim.seed=" + ",".join(str(i) for i in range(seeds))]
    reg = _registry(workspace)
    out_dir = out or str(_P("ladders") / _P(config).stem)
    results = run_ladder(config, vary, tasks if len(tasks) > 1 else tasks[0], out_dir, registry=reg,
                         rule=GateRule.parse(rule),
                         settings=GenerationSettings(max_new_tokens=max_new_tokens,
                                                     **_prompting(prompt_style, instruction, system)),
                         limits=Limits(timeout_s=timeout), unsafe_no_isolation=unsafe_no_isolation,
                         progress=progress, log=console.print, overrides=set_)
    header, rows = table_rows(parse_vary(vary), results)
    tables = [(f"ladder {out_dir}", header, rows)]
    by_seed = seed_rows(parse_vary(vary), results)
    if by_seed is not None:
        tables.append((f"ladder {out_dir}, over seeds", *by_seed))
    for title, header, rows in tables:
        t = Table(title=title)
        for h in header:
            t.add_column(h, overflow="fold")
        for r in rows:
            t.add_row(*r)
        console.print(t)
    console.print(f"wrote {out_dir}/ladder.md, ladder.csv, ladder.png")


@app.command("report")
def report_cmd(
    path: str = typer.Argument(..., help="A run, demo or ladder directory."),
    out: str = typer.Option(None, help="HTML file to write (default: PATH/report.html)."),
) -> None:
    """Write a self-contained HTML report (plots embedded as PNG): loss curves per step and epoch, per-task pass grids, the ladder table and plot, and the resolved configs."""
    from kdkit.decide.report import write_report

    target = write_report(path, out)
    console.print(f"wrote {target}")


@app.command("demo")
def demo_cmd(
    out: str = typer.Option("demo-out", help="Directory for the world, cache, runs, packs, registry and report."),
    seed: int = typer.Option(0, help="Seed of the student initialisation and the data order (the world is the teacher's)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Distil the bundled tiny teacher into a smaller student, train the same student without the teacher (same init, data, steps, seed), evaluate all three on anchors and holdout in the sandbox, gate the distilled student against the baseline, and print the table. Minutes on a laptop CPU, no download."""
    from kdkit.demo.run import DemoSettings, run_demo

    res = run_demo(out, DemoSettings(seed=seed), progress=progress, log=console.print)
    t = Table(title=f"kdkit demo (seed {seed})")
    for c in ("model", "parameters", "anchor pass [95%]", "holdout pass", "val loss", "KL to teacher",
              "precompute s", "train s"):
        t.add_column(c, overflow="fold")
    for m in res["models"]:
        lo, hi = m["anchor_interval"]
        kl = "—" if m["kl_to_teacher"] is None else f"{m['kl_to_teacher']:.4f}"
        t.add_row(m["model"], f"{m['parameters']:,}", f"{m['anchor_passed']}/{m['anchor_total']} [{100 * lo:.0f}–"
                  f"{100 * hi:.0f}%]", f"{m['holdout_passed']}/{m['holdout_total']}", f"{m['val_loss']:.4f}", kl,
                  f"{m.get('precompute_s', 0.0):.1f}", f"{m['wall_s']:.1f}")
    console.print(t)
    g = res["gate"]
    console.print(f"gate (distilled vs production = baseline, on the anchors only): [bold]{g['decision']}[/] — "
                  f"{g['reason']}")
    verdict = ("distillation beats the CE-only baseline on holdout" if res["distillation_wins_holdout"] else
               "distillation does NOT beat the CE-only baseline on holdout this time")
    console.print(f"{verdict} (Δ = {res['holdout_delta']:+d} tasks). Report: {res['report']}. "
                  f"Total {res['total_seconds']:.0f} s.")


if __name__ == "__main__":
    app()
