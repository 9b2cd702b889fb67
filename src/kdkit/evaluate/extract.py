"""From a model's generated text to the code that completes a task's prompt.

Two steps, in this order, on the *full* text:

1. :func:`answer_end` — while generating, where the answer is complete (the row stops there).
   A fenced block ends at its closing fence; an answer that continues the prompt's body ends
   at the first line in column 0 after an indented line; an answer that restates the function
   (``import``/``def``/``class``/decorator lines in column 0) ends at the first column-0 line
   after its body that is none of those (prose, ``if __name__``, a test, a ``print``).
   Nothing is cut before extraction: a chat answer that opens with a fence is kept whole.
2. :func:`extract_completion` — what follows the prompt. A continuation of the body is kept while
   its indentation lasts (blank lines inside the body included). A restated function (fenced or
   not) contributes its body, re-indented to the prompt's, followed by the answer's other
   top-level imports, functions, classes and assignments — they run before ``check`` calls the
   function, so imports written before a restated ``def`` and helper functions are kept.
"""

from __future__ import annotations

import ast
import re
import textwrap

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
_PROGRAM_LINE = re.compile(r"(?:async\s+def|def|class|import|from)\s|@")
_KEPT_NODES = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
               ast.AnnAssign)


def answer_end(text: str) -> int | None:
    """The index to cut a generated answer at once it is complete, else None (see the module doc)."""
    pos, in_fence, body, continuation = 0, False, False, None
    for line in text.split("\n")[:-1]:  # complete lines only: the last one may still grow
        s = line.strip()
        if s.startswith("```"):
            if in_fence:
                return pos + len(line)
            in_fence = True
        elif s and not in_fence:
            indented = line[0].isspace()
            if continuation is None:
                continuation = indented
            if indented:
                body = True
            elif body and (continuation or not _PROGRAM_LINE.match(line)):
                return pos
        pos += len(line) + 1
    return None


def extract_completion(prompt: str, generation: str) -> str:
    """The code to append to ``prompt``: the body of its last function, then any kept top-level code."""
    text = generation.replace("\r\n", "\n")
    name = _function_name(prompt)
    fenced = _FENCE.findall(text)
    if fenced:
        restating = [b for b in fenced if name and _defines(b, name)]
        text = restating[0] if restating else fenced[0]
    lines = text.split("\n")
    first = next((ln for ln in lines if ln.strip()), "")
    if name and (fenced or not first[:1].isspace()):
        program = _restated(text, name, _body_indent(prompt))
        if program is not None:
            return program
        for i, line in enumerate(lines):  # code that does not parse: the line-based body
            if re.match(rf"\s*(async\s+)?def\s+{re.escape(name)}\s*\(", line):
                lines = _drop_docstring(lines[i + 1:])
                break
    return _indented_body(lines)


def _indented_body(lines: list[str]) -> str:
    kept: list[str] = []
    for line in lines:
        if line.strip() and not line[0].isspace():
            break
        kept.append(line)
    while kept and kept[-1].strip() == "":
        kept.pop()
    return "\n".join(kept) + ("\n" if kept else "")


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _parse(code: str) -> ast.Module | None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(code)
        except (SyntaxError, ValueError):
            return None


def _restated(code: str, name: str, indent: str) -> str | None:
    """Body of the restated top-level ``def name`` + the other kept top-level code; None if it does not parse."""
    tree = _parse(code)
    if tree is None:
        return None
    fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name), None)
    if fn is None:
        return None
    lines = code.split("\n")
    stmts = fn.body
    if stmts and isinstance(stmts[0], ast.Expr) and isinstance(getattr(stmts[0], "value", None), ast.Constant) \
            and isinstance(stmts[0].value.value, str) and len(stmts) > 1:
        stmts = stmts[1:]  # the prompt already carries a docstring
    if stmts[0].lineno == fn.lineno:  # def f(x): return x
        body = "".join(f"{indent}{ast.unparse(st)}\n" for st in stmts)
    else:
        body = textwrap.indent(textwrap.dedent("\n".join(lines[stmts[0].lineno - 1:fn.end_lineno])), indent)
    extras = []
    for node in tree.body:
        if node is fn or not isinstance(node, _KEPT_NODES) or _calls(node, name):
            continue
        start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
        extras.append("\n".join(lines[start - 1:node.end_lineno]))
    return body.rstrip() + "\n" + "".join(f"\n\n{e.rstrip()}\n" for e in extras)


def _calls(node: ast.AST, name: str) -> bool:
    """An assignment that calls the function itself runs it at import time: a test, not a definition."""
    return isinstance(node, ast.Assign | ast.AnnAssign) and any(
        isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == name for c in ast.walk(node))


def _body_indent(prompt: str) -> str:
    """The indentation of the prompt's function body (its last indented line), 4 spaces by default."""
    for line in reversed(prompt.rstrip("\n").split("\n")):
        if line.strip() and line[0].isspace():
            return line[: len(line) - len(line.lstrip())]
    return "    "


def _function_name(prompt: str) -> str | None:
    names = re.findall(r"^\s*(?:async\s+)?def\s+([A-Za-z_]\w*)\s*\(", prompt, re.M)
    return names[-1] if names else None


def _drop_docstring(lines: list[str]) -> list[str]:
    """Remove a docstring that opens the body (the prompt already has one)."""
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i == len(lines):
        return lines
    head = lines[i].strip()
    for q in ('"""', "'''"):
        if head.startswith(q):
            if head.count(q) >= 2 and len(head) > 3:
                return lines[i + 1:]
            for j in range(i + 1, len(lines)):
                if q in lines[j]:
                    return lines[j + 1:]
            return lines
    return lines
