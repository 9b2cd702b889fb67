"""What a user sees of the CLI: complete help without type noise, readable output in a pipe at 80 columns."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.decide.registry import Registry
from tests.helpers import save_model_dir


def _commands(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        out += _commands(cmd, path) if getattr(cmd, "commands", None) else [path]  # typer's own click: no click.Group
    return out


COMMANDS = _commands(typer.main.get_command(app))


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_help_is_complete_and_shows_no_bool_type(cmd):
    res = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=100)
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output and "BOOLEAN" not in res.output
    params = typer.main.get_command(app)
    for part in cmd:
        params = params.commands[part]
    assert params.help, f"kdkit {' '.join(cmd)} has no description"
    for p in params.params:
        if getattr(p, "param_type_name", "") == "option" and p.name != "help":  # typer vendors click
            assert p.help, f"kdkit {' '.join(cmd)} {p.opts[0]} has no help text"


def test_tables_in_a_pipe_are_laid_out_wide_and_never_truncated(tmp_path):
    deep = tmp_path / "a-rather-long-directory-name" / "and-another-level-of-nesting" / "model-pack-v1"
    save_model_dir(deep, seed=1)
    ws = tmp_path / "workspace-with-a-long-name"
    reg = Registry(ws)
    reg.promote(reg.register(deep, name="production-model-with-a-long-name").id)
    res = CliRunner().invoke(app, ["registry", "list", "--workspace", str(ws)])  # not a terminal: 160 columns
    assert res.exit_code == 0, res.output
    assert "…" not in res.output
    table = [ln for ln in res.output.splitlines() if ln[:1] in "┏┃┡│└"]
    assert table and 80 < max(len(line) for line in table) <= 160
    name_cells = [ln.split("│")[2].strip() for ln in table if ln.startswith("│")]
    assert "production-model-with-a-long-name" in name_cells  # on one line, not folded mid-word
    assert f"1: {reg.pack(1).path}\n" in res.output  # the whole path, unbroken, greppable


def test_help_in_a_pipe_cuts_no_option_name():
    """Piped, rich would lay --help out 80 columns wide and cut long option names (`--unsafe-no-iso…`)."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    for cmd in (["gate"], ["eval"]):
        out = subprocess.run([sys.executable, "-m", "kdkit", *cmd, "--help"], capture_output=True, text=True,
                             env=env, check=True).stdout
        assert "--unsafe-no-isolation" in out and "--promote-undecided" in out or cmd == ["eval"]
        assert "…" not in out, out
