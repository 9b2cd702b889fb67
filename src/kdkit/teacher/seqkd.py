"""``kdkit generate``: sequence-level KD (Kim & Rush, 2016) — the teacher's completions as training rows.

Each prompt row (``{"prompt": ...}`` or ``{"messages": [...]}``; a completion or a final assistant
turn already there is replaced) gets the model's completion, greedy by default, and is written as a
training row of the same format, with its ``role``, ``task`` and ``weight`` kept. Rows are generated
in fixed batches in file order and appended batch by batch, so a killed run resumes at the last
complete batch and the file ends byte-identical to an uninterrupted run; a sidecar
``<out>.kdkit.json`` records the inputs, and a rerun with other inputs is refused naming the field.
With a server (``--teacher-url``: a teacher served by vLLM) the completions come from its
``/v1/completions`` on the same prompt token ids, the local directory giving the tokenizer and the chat
template; the model the server names is part of the inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kdkit.data.files import read_objects
from kdkit.models.generation import GenerationSettings, generate_ids
from kdkit.models.load import load_causal_lm, load_tokenizer
from kdkit.util.errors import KdkitError, OutputDirError
from kdkit.util.identity import changed_inputs, path_identity
from kdkit.util.io import atomic_write_json, storage
from kdkit.util.progress import Ticker, bar_shown
from kdkit.util.rng import own_rng

KEPT_FIELDS = ("role", "task", "weight")


class GenerateError(KdkitError, ValueError):
    """A prompt row or an output file that ``kdkit generate`` cannot use; the message names file and line."""


def sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".kdkit.json")


def read_prompts(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, row) for every prompt row; a row needs ``prompt`` (a string) or ``messages`` (a non-empty list)."""
    rows = read_objects(path, GenerateError)
    for line, obj in rows:
        if isinstance(obj.get("prompt"), str):
            if not obj["prompt"].strip():
                raise GenerateError(f"{path}:{line}: field 'prompt': empty; a prompt row needs text to continue")
            continue
        msgs = obj.get("messages")
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                                                    isinstance(m.get("content"), str) for m in msgs):
            if [m for m in msgs if m["role"] != "assistant"]:
                continue
        raise GenerateError(f"{path}:{line}: field 'prompt': a prompt row needs 'prompt' (a string) or 'messages' "
                            f"(a list of {{role, content}} with at least one turn that is not the assistant's)")
    if not rows:
        raise GenerateError(f"{path}: no prompt rows")
    return rows


def _history(obj: dict[str, Any]) -> list[dict[str, str]]:
    msgs = list(obj["messages"])
    return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs


def prompt_tokens(tokenizer: Any, obj: dict[str, Any], path: str | Path, line: int) -> list[int]:
    """The ids training will see before the completion: the prompt with special tokens, or the chat
    history rendered by the tokenizer's template with the generation prompt."""
    if "prompt" in obj and isinstance(obj["prompt"], str):
        return list(tokenizer(obj["prompt"], add_special_tokens=True)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise GenerateError(f"{path}:{line}: field 'messages': the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(_history(obj), tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise GenerateError(f"{path}:{line}: field 'messages': the chat template renders this row to no token")
    return ids


def as_row(obj: dict[str, Any], completion: str) -> dict[str, Any]:
    kept = {k: obj[k] for k in KEPT_FIELDS if k in obj}
    if "prompt" in obj and isinstance(obj["prompt"], str):
        return {"prompt": obj["prompt"], "completion": completion, **kept}
    return {"messages": _history(obj) + [{"role": "assistant", "content": completion}], **kept}


def _inputs(model_dir: str, data: str, settings: GenerationSettings, server: Any = None) -> dict[str, Any]:
    """What the rows depend on: every file of the model directory (weights, tokenizer, chat template,
    generation config), the prompts' bytes, the generation settings and, served, the model the server names."""
    served = None if server is None else {"model": server.info()["model"], "vllm_version": server.info()["vllm_version"]}
    return {"model": path_identity(model_dir), "served": served,
            "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
            "settings": {"max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size,
                         "do_sample": settings.do_sample, "temperature": settings.temperature,
                         "top_p": settings.top_p, "seed": settings.seed}}


def _resume_point(out: Path, inputs: dict[str, Any], batch: int) -> int:
    """Rows already written by an earlier run with the same inputs, down to a whole batch (the file is cut
    back there); refuses a file kdkit did not write or one made from other inputs."""
    side = sidecar(out)
    if not out.exists():
        return 0
    if not side.is_file():
        raise OutputDirError(f"{out}: exists and was not written by `kdkit generate` (no {side.name}); "
                             f"choose another --out")
    old = json.loads(side.read_text())
    if not isinstance(old.get("model"), dict) or old["model"].get("sha256") != inputs["model"]["sha256"]:
        what = (changed_inputs({"model": old["model"]}, {"model": inputs["model"]})[0]
                if isinstance(old.get("model"), dict) and "files" in old["model"] else "model: another model")
        raise GenerateError(f"{out}: made from other inputs ({what}); choose another --out")
    for key in ("data_sha256", "settings", "served"):
        if old.get(key) != inputs[key]:
            raise GenerateError(f"{out}: made from other inputs ({key}: {old.get(key)!r} → {inputs[key]!r}); "
                                f"choose another --out")
    raw = out.read_bytes()
    lines = raw.split(b"\n")[:-1]  # a last line without its newline was cut by a crash
    keep = len(lines) - len(lines) % batch
    with out.open("r+b") as fh:
        fh.truncate(sum(len(x) + 1 for x in lines[:keep]))
    return keep


def _completer(model_dir: str, tokenizer: Any, settings: GenerationSettings, server: Any
               ) -> Callable[[list[list[int]], int], list[list[int]]]:
    """(prompt ids, seed) → completion ids: the local model's :func:`generate_ids`, or the server's, which
    stops at the same EOS ids (the model's generation config's and the tokenizer's)."""
    if server is None:
        model = load_causal_lm(model_dir)

        def local(chunk: list[list[int]], seed: int) -> list[list[int]]:
            with own_rng():
                torch.manual_seed(seed)
                return generate_ids(model, tokenizer, chunk, settings)
        return local
    from transformers import GenerationConfig

    try:
        own = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        own = json.loads((Path(model_dir) / "config.json").read_text()).get("eos_token_id")
    stops = sorted({int(i) for i in (own if isinstance(own, list) else [own]) if i is not None}
                   | {int(tokenizer.eos_token_id)})
    temperature = settings.temperature if settings.do_sample else 0.0
    return lambda chunk, seed: server.generate(chunk, settings.max_new_tokens, temperature, settings.top_p, seed, stops)


@contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
    """One ``kdkit generate`` at a time per output file: a second one is refused, not interleaved."""
    import fcntl

    lock = out.with_name(f".{out.name}.kdkit-lock")
    while True:
        with lock.open("a") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise GenerateError(f"{out}: another `kdkit generate` is writing it; wait for it to finish") from None
            try:
                if os.stat(lock).st_ino != os.fstat(fh.fileno()).st_ino:
                    continue  # the holder before us removed it after we opened it: lock the new one
            except FileNotFoundError:
                continue
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)  # removed while held: nothing is left behind, refused or not
            return


def generate_rows(model_dir: str, data: str, out: str | Path, settings: GenerationSettings, *,
                  progress: bool = True, log: Callable[[str], None] = print, server: Any = None) -> dict[str, Any]:
    """Write ``out`` (JSONL): every prompt row of ``data`` with the model's completion (the ``server``'s, a
    :class:`kdkit.teacher.served.Server`, when given; ``model_dir`` then gives the tokenizer). Returns a summary."""
    out = Path(out)
    if out.parent.is_dir():
        with _writer_lock(out), storage(out):
            return _generate(model_dir, data, out, settings, progress, log, server)
    raise GenerateError(f"{out}: the directory {out.parent} does not exist")


def _generate(model_dir: str, data: str, out: Path, settings: GenerationSettings, progress: bool,
              log: Callable[[str], None], server: Any) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rows = read_prompts(data)
    inputs = _inputs(model_dir, data, settings, server)
    done = _resume_point(out, inputs, settings.batch_size)
    if done >= len(rows) and json.loads(sidecar(out).read_text()).get("complete"):
        log(f"{out}: complete ({len(rows)} rows); nothing to do")
        return {"rows": len(rows), "generated": 0, "out": str(out)}
    if done:
        log(f"{out}: resuming after {done} rows")
    atomic_write_json(sidecar(out), {**inputs, "complete": False})
    tokenizer = load_tokenizer(model_dir)
    complete = _completer(model_dir, tokenizer, settings, server)
    prompts = [prompt_tokens(tokenizer, obj, data, line) for line, obj in rows]
    shown = bar_shown(progress)
    bar = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not shown)
    ticker = Ticker("generate", len(rows), "rows", log, enabled=not shown, done=done)
    with bar, out.open("ab") as fh:
        task = bar.add_task("generate", total=len(rows), completed=done)
        for lo in range(done, len(rows), settings.batch_size):
            chunk = prompts[lo:lo + settings.batch_size]
            completions = complete(chunk, settings.seed * 1_000_003 + lo)  # a batch's samples: not a resume's
            stops = {tokenizer.eos_token_id}
            for (_, obj), ids in zip(rows[lo:lo + len(chunk)], completions, strict=True):
                text = tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
                fh.write(json.dumps(as_row(obj, text), ensure_ascii=False, sort_keys=True).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
            bar.update(task, completed=lo + len(chunk))
            ticker.update(lo + len(chunk))
    atomic_write_json(sidecar(out), {**inputs, "complete": True})
    return {"rows": len(rows), "generated": len(rows) - done, "out": str(out)}
