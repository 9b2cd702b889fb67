"""The house: packages along the pipeline, every import pointing down, no circle between modules.

A module may import from its own package and from the packages listed before its own in :data:`LAYERS`
(every import counts: top-level, inside a function, and under ``TYPE_CHECKING``). ``from P import m``
where ``m`` is a module of ``P`` depends on ``P.m`` only. The public Python API that README shows
imports as written, and every package's ``__init__`` names (``__all__``) what it exports.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "kdkit"
LAYERS = ("util", "loss", "config", "data", "models", "teacher", "evaluate", "train", "decide", "demo", "cli")


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the kdkit modules it imports (anywhere in its body)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
                rest = [a for a in node.names if f"{base}.{a.name}" not in mods]
                deps |= subs | ({base} if rest and base in mods else set())
        graph[name] = deps - {name}
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 0 for a module importing no kdkit module, else one above its highest import."""
    memo: dict[str, int] = {}

    def floor(m: str) -> int:
        if m not in memo:
            memo[m] = 1 + max((floor(d) for d in graph[m]), default=-1)
        return memo[m]

    for m in graph:
        floor(m)
    return memo


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports into a later package of :data:`LAYERS` (the root may import only the thread set-up)."""
    up = [f"kdkit -> {d}" for d in graph["kdkit"] - {"kdkit.util.threads"}]
    for a, deps in graph.items():
        la = _layer(a)
        if la is None:
            assert a in ("kdkit", "kdkit.__main__"), f"{a} is in no package of LAYERS"
            continue
        up += [f"{a} -> {b}" for b in deps if b != "kdkit" and (_layer(b) is None or _layer(b) > la)]
    return sorted(up)


def circles(graph: dict[str, set[str]]) -> list[str]:
    """Every import circle a depth-first walk meets, as ``a -> b -> ... -> a``."""
    state: dict[str, int] = {}
    found = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                found.append(" -> ".join([*stack[stack.index(d):], d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def test_imports_point_down_the_pipeline():
    assert upward(import_graph()) == []


def test_no_import_circle():
    graph = import_graph()
    assert circles(graph) == []
    assert max(floors(graph).values()) <= 18  # __main__ → cli → its stage modules → ... → util.threads: 19 floors


def test_a_broken_rule_is_seen():
    """The checks read real edges: an upward import and a circle are both found."""
    graph = import_graph()
    assert "kdkit.models.load" in graph["kdkit.models.student"]  # a known edge, parsed
    graph["kdkit.util.io"] = graph["kdkit.util.io"] | {"kdkit.decide.gate"}
    assert upward(graph) == ["kdkit.util.io -> kdkit.decide.gate"]
    assert any(c.startswith("kdkit.util.io -> kdkit.decide.gate") or "kdkit.util.io" in c for c in circles(graph))


@pytest.mark.parametrize("package", [p for p in LAYERS if p != "demo"])
def test_each_package_names_what_it_exports(package):
    mod = importlib.import_module(f"kdkit.{package}")
    assert mod.__doc__ and mod.__all__, package
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"kdkit.{package}.{name}"
    modules = {p.stem for p in (SRC / package).glob("*.py")} | {p.name for p in (SRC / package).iterdir() if p.is_dir()}
    assert not modules & set(mod.__all__), "a name that is also a module hides the module"


def test_readme_public_api_imports():
    text = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    found = re.findall(r"^\s*from (kdkit[\w.]*) import ([\w, ]+)$", text, re.M)
    assert found, "README shows the Python API"
    for module, names in found:
        mod = importlib.import_module(module)
        for name in (n.strip() for n in names.split(",")):
            assert hasattr(mod, name), f"README: from {module} import {name}"
