"""The tiny world's executable code tasks, in HumanEval format, generated from a seed.

Each task is a one-line Python function over an int, a string or a list of ints,
described in an English docstring and checked by asserts on several inputs.
Functions compose one or two operations with constants, so the held-out split
(combinations and constants never seen together in training) cannot be passed by
memorising the training split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAMES = ["alpha", "bravo", "delta", "echo", "gamma", "kappa", "lima", "omega", "sigma", "tango", "zeta", "nova"]

# (english, python expression over the variable) for each argument type; {k} is a constant.
INT_OPS = [
    ("add {k} to it", "{v} + {k}"),
    ("subtract {k} from it", "{v} - {k}"),
    ("multiply it by {k}", "{v} * {k}"),
    ("take it modulo {k}", "{v} % {k}"),
    ("floor-divide it by {k}", "{v} // {k}"),
]
INT_FINAL = [
    ("return the result", "{e}"),
    ("return True if the result is greater than {k}", "{e} > {k}"),
    ("return the result squared", "({e}) ** 2"),
    ("return the absolute value of the result", "abs({e})"),
]
LIST_OPS = [
    ("return the sum of the elements", "sum({v})"),
    ("return the largest element", "max({v})"),
    ("return the smallest element", "min({v})"),
    ("return the number of elements greater than {k}", "len([t for t in {v} if t > {k}])"),
    ("return the elements plus {k}", "[t + {k} for t in {v}]"),
    ("return the elements times {k}", "[t * {k} for t in {v}]"),
    ("return the elements that are even", "[t for t in {v} if t % 2 == 0]"),
    ("return the list sorted", "sorted({v})"),
    ("return the list reversed", "{v}[::-1]"),
    ("return the first {k} elements", "{v}[:{k}]"),
]
STR_OPS = [
    ("return it in upper case", "{v}.upper()"),
    ("return it reversed", "{v}[::-1]"),
    ("return it repeated {k} times", "{v} * {k}"),
    ("return its first {k} characters", "{v}[:{k}]"),
    ("return the number of times '{c}' occurs in it", "{v}.count('{c}')"),
    ("return True if it starts with '{c}'", "{v}.startswith('{c}')"),
    ("return it with '{c}' appended", "{v} + '{c}'"),
    ("return its length plus {k}", "len({v}) + {k}"),
]
LETTERS = "abcdexyz"


@dataclass(frozen=True)
class Spec:
    kind: str  # int | list | str
    ops: tuple[int, ...]  # indices into the op tables
    consts: tuple[int, ...]
    char: str

    def key(self) -> tuple:
        return (self.kind, self.ops)


def _int_task(ops: tuple[int, int, int], ks: tuple[int, int, int]) -> tuple[str, str]:
    (d1, e1), (d2, e2) = INT_OPS[ops[0]], INT_OPS[ops[1]]
    df, ef = INT_FINAL[ops[2]]
    expr = e1.format(v="x", k=ks[0])
    expr = e2.format(v=f"({expr})", k=ks[1])
    expr = ef.format(e=expr, k=ks[2])
    doc = f"Given an integer x, {d1.format(k=ks[0])}, then {d2.format(k=ks[1])}, then {df.format(k=ks[2])}."
    return doc, expr


def _render(spec: Spec) -> dict[str, Any]:
    if spec.kind == "int":
        doc, expr = _int_task(spec.ops, spec.consts)  # type: ignore[arg-type]
        arg, inputs = "x", [-7, -1, 0, 3, 10, 25]
    elif spec.kind == "list":
        d, e = LIST_OPS[spec.ops[0]]
        doc = f"Given a non-empty list of integers xs, {d.format(k=spec.consts[0])}."
        expr = e.format(v="xs", k=spec.consts[0])
        arg, inputs = "xs", [[3, 1, 2], [5], [-4, 8, 0, 7], [2, 2, 9, 1, 6]]
    else:
        d, e = STR_OPS[spec.ops[0]]
        doc = f"Given a string s, {d.format(k=spec.consts[0], c=spec.char)}."
        expr = e.format(v="s", k=spec.consts[0], c=spec.char)
        arg, inputs = "s", ["abc", "", "xaxbx", "zebra", "aaa"]
    return {"doc": doc, "expr": expr, "arg": arg, "inputs": inputs}


def _task(task_id: str, name: str, spec: Spec) -> dict[str, Any] | None:
    r = _render(spec)
    prompt = f'def {name}({r["arg"]}):\n    """{r["doc"]}"""\n'
    body = f"    return {r['expr']}\n"
    fn: dict[str, Any] = {}
    exec(f"def {name}({r['arg']}):\n{body}", fn)  # our own generated code, to compute expected outputs
    outputs = [fn[name](x) for x in r["inputs"]]
    if len({repr(o) for o in outputs}) == 1:
        return None  # a constant function: its test could not tell a right answer from a guess
    asserts = "".join(f"    assert candidate({x!r}) == {o!r}\n" for x, o in zip(r["inputs"], outputs, strict=True))
    return {"task_id": task_id, "prompt": prompt, "entry_point": name,
            "test": f"def check(candidate):\n{asserts}", "canonical_solution": body}


def _random_spec(rng: random.Random) -> Spec:
    kind = rng.choices(["int", "list", "str"], weights=[3, 2, 2])[0]
    if kind == "int":
        ops = (rng.randrange(len(INT_OPS)), rng.randrange(len(INT_OPS)), rng.randrange(len(INT_FINAL)))
        consts = (rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9))
    elif kind == "list":
        ops, consts = (rng.randrange(len(LIST_OPS)),), (rng.randint(1, 9),)
    else:
        ops, consts = (rng.randrange(len(STR_OPS)),), (rng.randint(1, 4),)
    return Spec(kind, ops, consts, rng.choice(LETTERS))


def _has_constant(spec: Spec) -> bool:
    if spec.kind == "int":
        return True
    text = (LIST_OPS if spec.kind == "list" else STR_OPS)[spec.ops[0]][0]
    return "{k}" in text or "{c}" in text


@dataclass
class World:
    train: list[dict[str, Any]]
    anchors: list[dict[str, Any]]
    holdout: list[dict[str, Any]]


def make_world(seed: int = 0, n_train: int = 3000, n_anchors: int = 30, n_holdout: int = 40) -> World:
    """Deterministic splits. Holdout tasks are integer operation chains whose combination of steps
    never occurs in train or anchors, so they test composition, not recall. Anchors are unseen
    tasks built from operations the training split covers."""
    rng = random.Random(seed)
    int_keys = sorted({(a, b, f) for a in range(len(INT_OPS)) for b in range(len(INT_OPS))
                       for f in range(len(INT_FINAL))})
    rng.shuffle(int_keys)
    held_keys = set(int_keys[: max(1, len(int_keys) // 6)])
    seen: set[str] = set()

    def draw(n: int, prefix: str, holdout: bool) -> list[dict[str, Any]]:
        out = []
        while len(out) < n:
            spec = _random_spec(rng)
            if holdout and (spec.kind != "int" or spec.ops not in held_keys):
                continue  # holdout: only integer operation chains never seen in training
            if not holdout and spec.kind == "int" and spec.ops in held_keys:
                continue
            if prefix == "ANCHOR" and not _has_constant(spec):
                continue  # a constant-free op exists once; as an anchor it would never be trained on
            name = f"{rng.choice(NAMES)}_{rng.randint(10, 99)}"
            t = _task(f"{prefix}/{len(out)}", name, spec)
            if t is None:
                continue
            sig = t["prompt"].split("\n", 1)[1]  # the docstring: identical specs are one task
            if sig in seen:
                continue
            seen.add(sig)
            out.append(t)
        return out

    holdout = draw(n_holdout, "HOLD", True)
    anchors = draw(n_anchors, "ANCHOR", False)
    train = draw(n_train, "TRAIN", False)
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
