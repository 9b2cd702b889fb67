"""The documentation: the site builds with --strict (a dead link, a missing page or a page left out of the
navigation fails), README stays a front door, and its six commands are the getting-started page's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"}


def build(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", *args], cwd=root,
                          capture_output=True, text=True, env=ENV)


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    proc = build(ROOT, "-d", str(tmp_path / "site"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pages = {p.relative_to(ROOT / "docs").with_suffix("").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    built = {p.parent.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {p for p in pages if p != "index"} <= built  # every page is in the site


def test_a_dead_link_fails_the_build(tmp_path):
    pytest.importorskip("mkdocs")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\n[gone](no-such-page.md)\n")
    head = (ROOT / "mkdocs.yml").read_text().split("\nnav:")[0]
    (tmp_path / "mkdocs.yml").write_text(head + "\nnav:\n  - Home: index.md\n")
    proc = build(tmp_path)
    assert proc.returncode != 0 and "no-such-page.md" in proc.stdout + proc.stderr


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 250
    assert "distils language models and fine-tunes them on a KL leash" in " ".join(lines[:3])
    assert "make demo" in text and "make test" in text
    block = lambda t: t.split("<!-- six-commands:start -->")[1].split("<!-- six-commands:end -->")[0]  # noqa: E731
    six = block(text)
    assert six == block((ROOT / "docs" / "getting-started.md").read_text())
    commands = [c for c in six.splitlines() if c.startswith("kdkit ")]
    assert [c.split()[1] for c in commands] == ["model", "student", "precompute", "train", "eval", "gate"]
