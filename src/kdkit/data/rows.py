"""Training data: JSONL rows → tokenised rows with a loss mask, role, task and weight.

Accepted row formats (the ones TRL users already have), one JSON object per line:

* ``{"prompt": str, "completion": str}`` — loss on the completion tokens (and EOS);
* ``{"messages": [{"role": ..., "content": ...}, ...]}`` — rendered with the
  tokenizer's chat template, loss on the assistant turns;
* ``{"text": str}`` — loss on every token.

Optional per row: ``role`` (str, e.g. ``anchor``/``new``), ``task`` (str) and
``weight`` (number ≥ 0). Every error names the file, the line and the field.

A tokenised row keeps ``loss_mask[i]`` = "token i is a target": it is predicted
from position ``i − 1``. :func:`collate` turns rows into model inputs and shifted
targets (``-100`` where no loss).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.loss.divergences import IGNORE_INDEX  # noqa: F401 - re-exported: rows are collated with it
from kdkit.util.errors import KdkitError

FORMATS = ("prompt_completion", "messages", "text")
TRUNCATION_SIDES = ("left", "right")


class DataError(KdkitError, ValueError):
    """Bad input data; the message names file, line and field."""


@dataclass
class Example:
    """One parsed JSONL row, before tokenisation."""

    line: int
    format: str
    fields: dict[str, Any]
    role: str = "default"
    task: str = ""
    weight: float = 1.0
    teacher: str = ""  # a key of the config's ``teachers``; "" = the default ``teacher``


@dataclass
class TokenizedRow:
    input_ids: list[int]
    loss_mask: list[bool]
    role: str = "default"
    task: str = ""
    weight: float = 1.0
    line: int = 0
    truncated: bool = False
    text: str = ""  # with offsets (cross-tokenizer runs): the row's text and each token's character span in it
    offsets: list[tuple[int, int]] | None = None
    teacher: str = ""  # which teacher distils this row ("" = the default one)

    @property
    def n_targets(self) -> int:
        return int(sum(self.loss_mask[1:]))

    def loss_positions(self) -> np.ndarray:
        """Prediction positions t whose next token t+1 is a target (int32)."""
        m = np.asarray(self.loss_mask, dtype=bool)
        return (np.nonzero(m[1:])[0]).astype(np.int32)


@dataclass
class TokenizeReport:
    rows: int = 0
    truncated: int = 0
    empty: list[int] = field(default_factory=list)  # line numbers skipped for having no target token
    target_tokens: int = 0
    truncation: str = "left"

    def summary(self, max_length: int) -> str:
        side = {"left": "oldest tokens dropped", "right": "ends dropped"}[self.truncation]
        return (f"{self.rows} rows, {self.target_tokens} target tokens; {self.truncated} truncated to {max_length} "
                f"tokens ({self.truncation}: {side}); {len(self.empty)} without targets skipped")


def _err(path: Path, line: int, fld: str, msg: str) -> DataError:
    return DataError(f"{path}:{line}: field '{fld}': {msg}")


def _parse_row(path: Path, line: int, obj: dict[str, Any]) -> Example:
    has = {k for k in ("prompt", "completion", "messages", "text") if k in obj}
    if has == {"prompt", "completion"}:
        fmt = "prompt_completion"
        for k in ("prompt", "completion"):
            if not isinstance(obj[k], str):
                raise _err(path, line, k, f"expected a string, got {type(obj[k]).__name__}")
    elif has == {"messages"}:
        fmt = "messages"
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise _err(path, line, "messages", "expected a non-empty list of {role, content} objects")
        for i, m in enumerate(msgs):
            _check_message(path, line, i, m)
        tools = obj.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise _err(path, line, "tools", "expected a list of tool definitions (objects), as the chat template takes")
    elif has == {"text"}:
        fmt = "text"
        if not isinstance(obj["text"], str):
            raise _err(path, line, "text", f"expected a string, got {type(obj['text']).__name__}")
    else:
        _refuse_format(path, line, obj, has)
    role = obj.get("role", "default")
    if not isinstance(role, str) or not role:
        raise _err(path, line, "role", f"expected a non-empty string, got {role!r}")
    task = obj.get("task", "")
    if not isinstance(task, str):
        raise _err(path, line, "task", f"expected a string, got {task!r}")
    weight = obj.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not (weight >= 0) or weight == float("inf"):
        raise _err(path, line, "weight", f"expected a finite number >= 0, got {weight!r}")
    teacher = obj.get("teacher", "")
    if not isinstance(teacher, str):
        raise _err(path, line, "teacher", f"expected the name of one of the config's teachers, got {teacher!r}")
    return Example(line=line, format=fmt, fields=obj, role=role, task=task, weight=float(weight), teacher=teacher)


# what other tools call a row's fields: named in the error, so a user renames rather than guesses
OTHER_FIELDS = {"response": "completion", "answer": "completion", "output": "completion", "target": "completion",
                "chosen": "completion", "instruction": "prompt", "question": "prompt", "input": "prompt",
                "conversations": "messages", "conversation": "messages", "chat": "messages", "content": "text"}
CHAT_ROLES = ("system", "user", "assistant", "tool")
OTHER_ROLES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
               "function": "tool", "ipython": "tool"}


def _refuse_format(path: Path, line: int, obj: dict[str, Any], has: set[str]) -> None:
    """A row that is none of the formats: name the field another tool would have used, and kdkit's name."""
    others = [k for k in obj if k in OTHER_FIELDS and OTHER_FIELDS[k] not in has]
    if others:
        k = others[0]
        raise _err(path, line, k, f"kdkit does not read '{k}'; rename it to '{OTHER_FIELDS[k]}' (a row is one of: "
                   f"prompt+completion, messages, text)")
    found = ", ".join(sorted(has)) or "none of them"
    raise _err(path, line, "<format>", f"a row needs exactly one of: prompt+completion, messages, text (found: {found})")


def _check_message(path: Path, line: int, i: int, m: Any) -> None:
    """A chat turn: a string ``role``; ``content`` a string or a list of text parts; an assistant turn may
    carry ``tool_calls`` (a list of objects) instead of content; a ``tool`` turn's content is its output."""
    where = f"messages[{i}]"
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or ("content" not in m and not m.get("tool_calls")):
        raise _err(path, line, where, "expected an object with a string 'role' and a 'content'")
    if m["role"] not in CHAT_ROLES:
        hint = f" (did you mean '{OTHER_ROLES[m['role']]}'?)" if m["role"] in OTHER_ROLES else ""
        raise _err(path, line, f"{where}.role", f"unknown role {m['role']!r}{hint}; a chat turn's role is one of: "
                   f"{', '.join(CHAT_ROLES)}")
    calls = m.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
        raise _err(path, line, f"{where}.tool_calls", "expected a list of tool-call objects")
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise _err(path, line, f"{where}.content", "a list of parts must hold text parts only "
                       "({\"type\": \"text\", \"text\": ...})")
    elif not isinstance(content, str) and not (content is None and calls):
        raise _err(path, line, f"{where}.content", "expected a string or a list of text parts (or, beside "
                   "tool_calls, nothing)")


def chat_inputs(ex: Example) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A chat row as the chat template takes it: text parts joined into one string, and the row's ``tools``
    (when it has them) for the template's tools block."""
    msgs = []
    for m in ex.fields["messages"]:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p["text"] for p in content)
        msgs.append({**m, "content": content if content is not None else ""})
    tools = ex.fields.get("tools")
    return msgs, ({"tools": tools} if tools else {})


def read_examples(path: str | Path) -> list[Example]:
    """Parse a training file: JSONL (blank lines skipped, anything else malformed is an error), or Parquet,
    Arrow, CSV, JSON or a ``save_to_disk`` directory through ``datasets`` (:mod:`kdkit.data.files`)."""
    return list(iter_examples(path))


def iter_examples(path: str | Path) -> Iterator[Example]:
    """:func:`read_examples` one row at a time, in the file's order."""
    from kdkit.data.files import iter_objects

    for n, obj in iter_objects(path, DataError):
        yield _parse_row(Path(path), n, obj)


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat_text(tokenizer: Any, messages: list[dict], **kw: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kw)


def _tokenize_messages(tokenizer: Any, path: Path, ex: Example) -> tuple[list[int], list[bool]]:
    """Render with the chat template; targets are the tokens that overlap an assistant turn's characters.

    An assistant turn is the text the template adds between "history + generation prompt" and
    "history + this turn" (both must be prefixes of the full rendering). Spans are located in
    characters, then mapped to tokens by the tokenizer's offsets, so a tokenizer that merges the
    role header with the start of the answer (SmolLM2: ``assistant\\n`` + indentation) still works: a
    token that straddles the boundary is a target, since the model must produce it to answer.
    """
    msgs, kw = chat_inputs(ex)
    if getattr(tokenizer, "chat_template", None) is None:
        raise _err(path, ex.line, "messages", "the tokenizer has no chat template; use prompt/completion or text rows")
    if not getattr(tokenizer, "is_fast", False):
        raise _err(path, ex.line, "messages", "locating assistant turns needs a fast tokenizer (offset mapping)")
    text = _chat_text(tokenizer, msgs, **kw)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":  # the user's, the system's and the tools' outputs are never targets
            continue
        before = _chat_text(tokenizer, msgs[:i], add_generation_prompt=True, **kw) if i or kw else ""
        upto = _chat_text(tokenizer, msgs[: i + 1], **kw)
        if not text.startswith(upto) or not upto.startswith(before):
            raise _err(path, ex.line, f"messages[{i}]", "the chat template does not render earlier turns as a prefix "
                       "of later ones; cannot locate the assistant's text")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a < hi and lo < b for lo, hi in spans) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def tokenize_example(tokenizer: Any, path: Path, ex: Example) -> tuple[list[int], list[bool]]:
    """Token ids and the target mask of one example (before truncation)."""
    if ex.format == "prompt_completion":
        p = _encode(tokenizer, ex.fields["prompt"], True)
        c = _encode(tokenizer, ex.fields["completion"], False)
        if ex.fields["completion"] and tokenizer.eos_token_id is not None:
            c = c + [tokenizer.eos_token_id]
        return p + c, [False] * len(p) + [True] * len(c)
    if ex.format == "messages":
        return _tokenize_messages(tokenizer, path, ex)
    ids = _encode(tokenizer, ex.fields["text"], True)
    return ids, [True] * len(ids)


def kept_tokens(ids: list[int], max_length: int, side: str, bos_id: int | None) -> list[int]:
    """The indices of the tokens a row keeps when cut to ``max_length``. ``right`` drops the end; ``left``
    drops the oldest tokens and keeps the end (the completion, the latest turns), keeping a leading BOS."""
    if len(ids) <= max_length:
        return list(range(len(ids)))
    if side == "right":
        return list(range(max_length))
    keep_bos = bos_id is not None and ids[0] == bos_id
    n = max_length - int(keep_bos)
    return list(range(int(keep_bos))) + list(range(len(ids) - n, len(ids)))


def truncate(ids: list[int], mask: list[bool], max_length: int, side: str, bos_id: int | None
             ) -> tuple[list[int], list[bool]]:
    """Cut a row to ``max_length`` tokens (see :func:`kept_tokens`)."""
    keep = kept_tokens(ids, max_length, side, bos_id)
    return [ids[i] for i in keep], [mask[i] for i in keep]


def text_offsets(tokenizer: Any, path: Path, ex: Example, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The row's text and each of its tokens' character span (special tokens: an empty span), for aligning
    two tokenisations of it. Prompt/completion and text rows only."""
    if ex.format == "messages":
        raise _err(path, ex.line, "messages", "cross-tokenizer distillation aligns one text: use prompt/completion "
                   "or text rows (each tokenizer would render its own chat template)")

    def enc(text: str, special: bool, shift: int) -> tuple[list[int], list[tuple[int, int]]]:
        e = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        return list(e["input_ids"]), [(a + shift, b + shift) if b > a else (shift, shift)
                                      for a, b in e["offset_mapping"]]

    if ex.format == "text":
        text = ex.fields["text"]
        got, offs = enc(text, True, 0)
    else:
        prompt, completion = ex.fields["prompt"], ex.fields["completion"]
        text = prompt + completion
        got, offs = enc(prompt, True, 0)
        c_ids, c_offs = enc(completion, False, len(prompt))
        got, offs = got + c_ids, offs + c_offs
        if len(got) < len(ids):  # the EOS tokenize_example appended
            got, offs = got + ids[len(got):], offs + [(len(text), len(text))] * (len(ids) - len(got))
    if got != ids:
        raise _err(path, ex.line, ex.format, "the tokenizer's offsets do not describe the row's tokens")
    return text, offs


def kept_text(text: str, offsets: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    """The span of ``text`` that a truncated row's tokens cover, and their offsets in it: another tokenizer
    (a cross-tokenizer teacher) then sees the text the student kept, not the whole row."""
    spans = [(a, b) for a, b in offsets if b > a]
    if not spans:
        return "", [(0, 0)] * len(offsets)
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    return text[lo:hi], [(min(max(a - lo, 0), hi - lo), min(max(b - lo, 0), hi - lo)) for a, b in offsets]


def tokenize_rows(
    tokenizer: Any,
    path: str | Path,
    examples: Iterable[Example],
    *,
    max_length: int,
    on_empty: str = "skip",
    truncation: str = "left",
    offsets: bool = False,
) -> tuple[list[TokenizedRow], TokenizeReport]:
    """Tokenise, truncate to ``max_length`` tokens (see :func:`truncate`), and account for what was cut
    or skipped.

    ``on_empty``: ``skip`` drops rows left with no target token (reported by line),
    ``error`` refuses them. ``offsets``: also keep each row's text and its tokens' character spans.
    """
    rep = TokenizeReport(truncation=truncation)
    rows = list(iter_tokenized(tokenizer, path, examples, rep, max_length=max_length, on_empty=on_empty,
                               offsets=offsets))
    return rows, rep


def iter_tokenized(tokenizer: Any, path: str | Path, examples: Iterable[Example], rep: TokenizeReport, *,
                   max_length: int, on_empty: str = "skip", offsets: bool = False) -> Iterator[TokenizedRow]:
    """:func:`tokenize_rows` one row at a time (truncation: ``rep.truncation``); ``rep`` counts as rows go by
    and is complete when the iterator ends."""
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    if on_empty not in ("skip", "error"):
        raise DataError(f"on_empty must be 'skip' or 'error', got {on_empty!r}")
    if rep.truncation not in TRUNCATION_SIDES:
        raise DataError(f"truncation must be one of {', '.join(TRUNCATION_SIDES)}, got {rep.truncation!r}")
    path = Path(path)
    for ex in examples:
        row = _tokenize_one(tokenizer, path, ex, max_length, rep.truncation, offsets)
        if row.n_targets == 0:
            if on_empty == "error":
                what = "completion" if ex.format == "prompt_completion" else ex.format
                why = "after truncation to max_length" if row.truncated else "it is empty"
                raise _err(path, ex.line, what, f"no target token ({why}); pass on_empty=skip to drop such rows")
            rep.empty.append(ex.line)
            continue
        rep.truncated += int(row.truncated)
        rep.target_tokens += row.n_targets
        rep.rows += 1
        yield row
    if not rep.rows:
        raise DataError(f"{path}: no row has a target token (skipped lines: {rep.empty[:10]})")


def _tokenize_one(tokenizer: Any, path: Path, ex: Example, max_length: int, truncation: str, offsets: bool
                  ) -> TokenizedRow:
    ids, mask = tokenize_example(tokenizer, path, ex)
    text, offs = text_offsets(tokenizer, path, ex, ids) if offsets else ("", None)
    truncated = len(ids) > max_length
    keep = kept_tokens(ids, max_length, truncation, getattr(tokenizer, "bos_token_id", None))
    kept_offs = [offs[i] for i in keep] if offs is not None else None
    if kept_offs is not None and truncated:
        text, kept_offs = kept_text(text, kept_offs)
    return TokenizedRow([ids[i] for i in keep], [mask[i] for i in keep], ex.role, ex.task, ex.weight, ex.line,
                        truncated, text, kept_offs, ex.teacher)


def load_dataset(tokenizer: Any, path: str | Path, *, max_length: int, on_empty: str = "skip",
                 truncation: str = "left", offsets: bool = False) -> tuple[list[TokenizedRow], TokenizeReport]:
    """:func:`read_examples` + :func:`tokenize_rows`."""
    return tokenize_rows(tokenizer, path, read_examples(path), max_length=max_length, on_empty=on_empty,
                         truncation=truncation, offsets=offsets)


def data_fingerprint(rows: Iterable[TokenizedRow]) -> str:
    """sha256 over every row's token ids and target mask (what the teacher sees and where it is read)."""
    h = RowHash()
    for r in rows:
        h.update(r)
    return h.hexdigest()


class RowHash:
    """:func:`data_fingerprint` a row at a time."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, r: TokenizedRow) -> None:
        ids = np.asarray(r.input_ids, dtype=np.int64)
        self._h.update(np.int64(len(ids)).tobytes())
        self._h.update(ids.tobytes())
        self._h.update(np.asarray(r.loss_mask, dtype=np.uint8).tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@dataclass
class Batch:
    """Model inputs and shifted targets for a list of rows (right-padded).

    input_ids, attention_mask: LongTensor[B, L]; targets: LongTensor[B, L-1] where
    ``targets[b, t]`` is the token predicted by ``logits[b, t]`` (``-100``: no loss).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    roles: list[str]
    tasks: list[str]
    weights: torch.Tensor
    row_index: list[int]
    teachers: list[str] = field(default_factory=list)  # each row's teacher name ("" = the default)

    def to(self, device: torch.device) -> Batch:
        """The tensors on ``device`` (in place; returns the batch)."""
        for name in ("input_ids", "attention_mask", "targets", "weights"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences as one LongTensor [B, max length] padded with ``pad_id`` on ``side`` (``right`` for
    training and scoring, ``left`` for generation), and its attention mask. The one padding helper."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[b, span], att[b, span] = torch.tensor(list(s), dtype=torch.long), 1
    return ids, att


def collate(rows: Sequence[TokenizedRow], pad_id: int, row_index: Sequence[int] | None = None) -> Batch:
    if not rows:
        raise ValueError("collate: empty batch")
    ids, att = pad([r.input_ids for r in rows], pad_id)
    bsz = len(rows)
    tgt = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        m = torch.tensor(r.loss_mask, dtype=torch.bool)
        tgt[b, :n] = torch.where(m, ids[b, :n], torch.full((n,), IGNORE_INDEX))
    return Batch(
        input_ids=ids,
        attention_mask=att,
        targets=tgt[:, 1:].contiguous(),
        roles=[r.role for r in rows],
        tasks=[r.task for r in rows],
        weights=torch.tensor([r.weight for r in rows], dtype=torch.float32),
        row_index=list(row_index) if row_index is not None else list(range(bsz)),
        teachers=[r.teacher for r in rows],
    )


@dataclass
class Packing:
    """A batch's rows laid end to end in fewer sequences (``data.packing``): each row's positions restart at 0,
    so the model's packed-sequence mask keeps every row to itself (no attention across rows). ``index[b, t]``
    is the flat packed slot that holds the batch's position (b, t); :meth:`unpack` puts a packed output back in
    the batch's layout, where every loss and signal is computed as without packing."""

    input_ids: torch.Tensor  # [P, Lp]
    position_ids: torch.Tensor  # [P, Lp]
    index: torch.Tensor  # [B, L], into the flattened [P * Lp]

    def unpack(self, out: torch.Tensor) -> torch.Tensor:
        """[P, Lp, ...] -> [B, L, ...] (a padding position takes its row's last token's output: never read)."""
        return out.flatten(0, 1)[self.index]


def pack(batch: Batch, capacity: int, pad_id: int) -> Packing:
    """First-fit decreasing (ties by row) of the batch's rows into sequences of at most ``capacity`` tokens."""
    lengths = batch.attention_mask.sum(1).tolist()
    bins: list[list[int]] = []
    room: list[int] = []
    for b in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = next((k for k, free in enumerate(room) if free >= lengths[b]), len(bins))
        if j == len(bins):
            bins.append([])
            room.append(max(capacity, lengths[b]))
        bins[j].append(b)
        room[j] -= lengths[b]
    width = max(sum(lengths[b] for b in rows) for rows in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long, device=batch.input_ids.device)
    pos = torch.zeros_like(ids)
    index = torch.zeros_like(batch.input_ids)
    for j, rows in enumerate(bins):
        start = 0
        for b in rows:
            n = lengths[b]
            ids[j, start:start + n] = batch.input_ids[b, :n]
            pos[j, start:start + n] = torch.arange(n)
            index[b] = j * width + start + torch.clamp(torch.arange(index.shape[1]), max=n - 1)
            start += n
        pos[j, start:] = torch.arange(width - start)  # the padding: a sequence of its own
    return Packing(ids, pos, index)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic batches of indices, longest first (ties by index), for padding-light inference."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
