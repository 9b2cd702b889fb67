"""The docs' command pages run top to bottom as written, in the site's navigation order (slow: `make test-all`).

The demo itself runs at reduced size (the demo page's `kdkit demo` line is the full one); every other
command of the pages under "Commands" in mkdocs.yml runs verbatim, with /tmp paths moved into the test's
directory — but `kdkit model import`'s page, which installs a wheel (tests/test_convert.py runs it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdkit.demo.run import TEACHER_DIR, DemoSettings, run_demo
from tests.vllm_server import require_vllm

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed"),
              pytest.mark.skipif(not (TEACHER_DIR / "model.safetensors").is_file(), reason="no demo teacher")]


NOT_RUN = {"commands/model-import.md"}  # pip installs a wheel: tests/test_convert.py imports it instead


def command_pages() -> list[Path]:
    """The pages under "Commands" in mkdocs.yml, in the navigation's order."""
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    (section,) = [entry["Commands"] for entry in nav if isinstance(entry, dict) and "Commands" in entry]
    return [ROOT / "docs" / next(iter(e.values())) for e in section if next(iter(e.values())) not in NOT_RUN]


def readme_commands(text: str) -> list[str]:
    """Each shell command of the bash blocks of ``text``, continuation lines joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
            if cmd.strip():
                commands.append(cmd.strip())
    return commands


def test_readme_commands_run_top_to_bottom(tmp_path):
    commands = [c for page in command_pages() for c in readme_commands(page.read_text())]
    assert commands[0].startswith("kdkit demo") and any(c.startswith("kdkit registry rollback") for c in commands)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    (tmp_path / "src").symlink_to(ROOT / "src")
    (tmp_path / ".venv-vllm").symlink_to(require_vllm().parents[1])  # "A served teacher" starts vLLM from it
    run_demo(tmp_path / "demo-out", DemoSettings(student_rows=128, epochs=1, n_anchors=10, n_holdout=10,
                                                 max_new_tokens=64), progress=False, log=lambda m: None)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for cmd in commands[1:]:
        cmd = cmd.replace("/tmp/", f"{tmp_path}/tmp-")
        proc = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True)
        allowed = (0, 1, 3) if cmd.startswith("kdkit gate") else (0,)  # REVERT exits 1, UNDECIDED 3, by design
        assert proc.returncode in allowed, f"{cmd}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
        assert "Traceback" not in proc.stderr, cmd
