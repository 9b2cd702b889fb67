"""The tiny world's executable code tasks, in HumanEval format, generated from a seed.

Each task is a short Python function over an int, a list of ints or a string,
described in an English docstring as a chain of steps ("double it, then add one,
then square it") and checked by asserts on several inputs. The solution writes
one line per step, so the body has several lines (which also exercises the
extractor). The world is the set of all chains up to a length; the holdout split
is three-step integer chains never seen as a whole in training, so it tests
composition of known steps, not recall.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAMES = ["alpha", "bravo", "delta", "echo", "gamma", "kappa", "lima", "omega", "sigma", "tango", "zeta", "nova"]

INT_STEPS = [
    ("double it", "x = x * 2"),
    ("triple it", "x = x * 3"),
    ("add one", "x = x + 1"),
    ("add ten", "x = x + 10"),
    ("subtract one", "x = x - 1"),
    ("square it", "x = x * x"),
    ("negate it", "x = -x"),
    ("halve it", "x = x // 2"),
    ("take it modulo seven", "x = x % 7"),
    ("take its absolute value", "x = abs(x)"),
]
LIST_STEPS = [
    ("sort it", "xs = sorted(xs)"),
    ("reverse it", "xs = xs[::-1]"),
    ("keep the even elements", "xs = [t for t in xs if t % 2 == 0]"),
    ("double every element", "xs = [t * 2 for t in xs]"),
    ("add one to every element", "xs = [t + 1 for t in xs]"),
    ("drop the first element", "xs = xs[1:]"),
    ("keep the first three elements", "xs = xs[:3]"),
]
LIST_FINAL = [("return it", "return xs"), ("return its sum", "return sum(xs)"), ("return its length", "return len(xs)")]
STR_STEPS = [
    ("upper-case it", "s = s.upper()"),
    ("reverse it", "s = s[::-1]"),
    ("double it", "s = s + s"),
    ("drop its first character", "s = s[1:]"),
    ("append an exclamation mark", "s = s + '!'"),
    ("replace every 'a' with 'o'", "s = s.replace('a', 'o')"),
]
STR_FINAL = [("return it", "return s"), ("return its length", "return len(s)")]

INPUTS = {
    "x": [-7, -1, 0, 3, 10, 25],
    "xs": [[3, 1, 2, 8], [5], [-4, 8, 0, 7, 6], [2, 2, 9, 1, 6]],
    "s": ["abc", "", "banana", "zebra", "aaa"],
}
GIVEN = {"x": "an integer x", "xs": "a list of integers xs", "s": "a string s"}


@dataclass(frozen=True)
class Spec:
    arg: str  # x | xs | s
    steps: tuple[int, ...]
    final: int  # index into the final table (ints: always "return it")

    def render(self) -> tuple[str, list[str]]:
        table = {"x": INT_STEPS, "xs": LIST_STEPS, "s": STR_STEPS}[self.arg]
        final = {"x": [("return it", "return x")], "xs": LIST_FINAL, "s": STR_FINAL}[self.arg][self.final]
        phrases = [table[i][0] for i in self.steps] + [final[0]]
        lines = [table[i][1] for i in self.steps] + [final[1]]
        text = ", then ".join(phrases)
        return f"Given {GIVEN[self.arg]}, {text}.", lines


def universe() -> list[Spec]:
    """Every task of the world: int chains of 1–3 steps, list and string chains of 1–2 steps."""
    out = [Spec("x", c, 0) for n in (1, 2, 3) for c in itertools.product(range(len(INT_STEPS)), repeat=n)]
    for arg, steps, finals in (("xs", LIST_STEPS, LIST_FINAL), ("s", STR_STEPS, STR_FINAL)):
        out += [Spec(arg, c, f) for n in (1, 2) for c in itertools.product(range(len(steps)), repeat=n)
                for f in range(len(finals))]
    return out


def make_task(task_id: str, name: str, spec: Spec) -> dict[str, Any] | None:
    """A HumanEval-format task, or None when the chain is a constant function (its test proves nothing)."""
    doc, lines = spec.render()
    prompt = f'def {name}({spec.arg}):\n    """{doc}"""\n'
    body = "".join(f"    {ln}\n" for ln in lines)
    fn: dict[str, Any] = {}
    exec(f"def {name}({spec.arg}):\n{body}", fn)  # our own generated code: computes the expected outputs
    outputs = [fn[name](x) for x in INPUTS[spec.arg]]
    if len({repr(o) for o in outputs}) == 1:
        return None
    asserts = "".join(f"    assert candidate({x!r}) == {o!r}\n" for x, o in zip(INPUTS[spec.arg], outputs, strict=True))
    return {"task_id": task_id, "prompt": prompt, "entry_point": name,
            "test": f"def check(candidate):\n{asserts}", "canonical_solution": body}


@dataclass
class World:
    train: list[dict[str, Any]]
    anchors: list[dict[str, Any]]
    holdout: list[dict[str, Any]]


def make_world(seed: int = 0, n_anchors: int = 30, n_holdout: int = 40) -> World:
    """Deterministic splits of the universe: holdout = unseen 3-step integer chains; anchors = other
    unseen chains; train = everything else."""
    rng = random.Random(seed)
    specs = universe()
    rng.shuffle(specs)
    names = [f"{a}_{b}" for a in NAMES for b in NAMES if a != b]
    tasks: list[tuple[Spec, dict[str, Any]]] = []
    for spec in specs:
        t = make_task("", rng.choice(names), spec)
        if t is not None:
            tasks.append((spec, t))
    holdout = [t for s, t in tasks if s.arg == "x" and len(s.steps) == 3][:n_holdout]
    held = {id(t) for t in holdout}
    rest = [t for _, t in tasks if id(t) not in held]
    anchors, train = rest[:n_anchors], rest[n_anchors:]
    for prefix, split in (("HOLD", holdout), ("ANCHOR", anchors), ("TRAIN", train)):
        for i, t in enumerate(split):
            t["task_id"] = f"{prefix}/{i}"
    return World(train, anchors, holdout)


def training_rows(tasks: list[dict[str, Any]], role: str = "new") -> list[dict[str, Any]]:
    return [{"prompt": t["prompt"], "completion": t["canonical_solution"], "task": t["task_id"], "role": role}
            for t in tasks]


def write_world(world: World, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in (("train", training_rows(world.train)), ("anchors", world.anchors),
                       ("holdout", world.holdout)):
        p = out / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        paths[name] = p
    return paths
