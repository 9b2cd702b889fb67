"""A candidate evaluated through a vLLM server: the same prompts, stop rule, extraction and sandbox as the
local path, the answers written by the server.

What the server answers with is the candidate, never merged first:

* a LoRA adapter (a run's ``final/`` of a LoRA run, a run directory, or a PEFT adapter directory) is loaded
  at run time under a fresh name (``/v1/load_lora_adapter``; start vLLM with ``--enable-lora``,
  ``--max-lora-rank`` at least the adapter's r, and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``) and unloaded
  after, so production and several candidates are evaluated on one server without a restart;
* the model the server serves (the same files as its ``--model``) is asked as it is;
* any other full model's weights are loaded in place (``/collective_rpc`` ``reload_weights``, then
  ``/reset_prefix_cache``; start vLLM with ``VLLM_SERVER_DEV_MODE=1``), and the served model's own weights
  are loaded back after.

Greedy decoding only: the server's sampler draws other samples than the local path's, and a repetition
penalty is applied by other code; both are refused rather than reported under the local path's name.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.models.generation import GenerationSettings, StopRule
from kdkit.teacher.served import ServedError, Server
from kdkit.util.errors import UsageError
from kdkit.util.identity import path_identity

ADAPTER_FILE = "adapter_config.json"


class CannotServe(ServedError):
    """The server cannot answer as a whole model: it neither serves it nor can load its weights in place."""


@dataclass(frozen=True)
class ServerSpec:
    """Where answers are written: a vLLM server's URL and, when it serves several base models, which."""

    url: str
    model: str | None = None


def adapter_dir(candidate: Path) -> Path | None:
    """The LoRA adapter a candidate names: a PEFT adapter directory, or a LoRA run (or its ``final/``)."""
    for d in (candidate, candidate / "final"):
        if (d / ADAPTER_FILE).is_file():
            return d
    return None


def same_files(a: str | Path, b: str | Path) -> bool:
    """Two model directories with the same files (names and bytes)."""
    return Path(a).resolve() == Path(b).resolve() or path_identity(a)["sha256"] == path_identity(b)["sha256"]


def check_settings(settings: GenerationSettings) -> None:
    if settings.do_sample:
        raise UsageError("--sample with --server: vLLM's sampler draws other samples than the local path's; "
                         "evaluate a sampled run without --server (greedy answers are the same on both)")
    if settings.repetition_penalty != 1.0:
        raise UsageError("--repetition-penalty with --server: vLLM applies it by other code than the local path; "
                         "leave it at 1.0 or evaluate without --server")


@dataclass
class ServedCandidate:
    """A candidate the server answers as: ``name`` is the model asked; ``how``: served, adapter or weights."""

    server: Server
    candidate: Path
    name: str
    how: str
    base: str

    @classmethod
    def open(cls, url: str, candidate: str | Path, served_model: str | None = None) -> ServedCandidate:
        """Make the server answer as ``candidate`` (see the module docstring); :meth:`close` undoes it."""
        server = Server(url, served_model)
        try:
            info = server.info()
        except ServedError as e:
            raise ServedError(f"--server: {e}") from None
        base, candidate = info["model"], Path(candidate)
        adapter = adapter_dir(candidate)
        if adapter is not None:
            _check_adapter_base(adapter, info.get("root"))
            name = f"kdkit-eval-{uuid.uuid4().hex[:12]}"  # unique on a shared server
            server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(adapter.resolve())})
            server.model = name
            return cls(server, adapter, name, "adapter", base)
        if info.get("root") and Path(info["root"]).is_dir() and same_files(info["root"], candidate):
            return cls(server, candidate, base, "served", base)
        if not info.get("root") or not Path(info["root"]).is_dir():
            raise CannotServe(f"--server {url} serves {info.get('root')!r}, which is not a directory here: a full "
                              f"model is loaded in place only on a server whose own weights it can load back")
        _reload(server, candidate)
        return cls(server, candidate, base, "weights", base)

    def describe(self) -> str:
        """How the server answers as the candidate, for a log line."""
        return {"served": f"its own model {self.name}", "adapter": f"adapter {self.candidate} loaded as {self.name}",
                "weights": f"{self.candidate}'s weights loaded in place of {self.base}"}[self.how]

    def close(self) -> None:
        """The server as it was: the adapter unloaded, or its own weights loaded back."""
        if self.how == "adapter":
            self.server.post("/v1/unload_lora_adapter", {"lora_name": self.name})
        elif self.how == "weights":
            _reload(self.server, Path(self.server.info()["root"]))
        self.server.model = self.base

    def __enter__(self) -> ServedCandidate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings, stop: StopRule,
                 add_special_tokens: bool, stop_ids: list[int], on_batch: Callable[[int], None] | None = None,
                 on_texts: Callable[[int, int, list[str]], None] | None = None) -> list[list[str]]:
        """Each prompt's greedy answer, cut by ``stop`` as the local path cuts it (one sample each). Prompts go
        to the server ``settings.batch_size`` × 4 at a time (it batches them itself); each part's texts reach
        ``on_texts`` as soon as they are in, to be verified while the next part is written."""
        check_settings(settings)
        outs: list[list[str]] = []
        part = settings.batch_size * 4
        for lo in range(0, len(prompts), part):
            chunk = list(prompts[lo:lo + part])
            ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in chunk]
            answers = self.server.generate(ids, settings.max_new_tokens, 0.0, 1.0, settings.seed, stop_ids)
            texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            texts = [t if (cut := stop(t)) is None else t[:cut] for t in texts]
            outs += [[t] for t in texts]
            if on_texts is not None:
                on_texts(0, lo, texts)
            if on_batch is not None:
                on_batch(len(chunk))
        return outs


def _reload(server: Server, weights: Path) -> None:
    try:
        server.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(weights.resolve())}})
        server.post("/reset_prefix_cache", {})
    except ServedError as e:
        raise CannotServe(f"--server: loading {weights}'s weights in place failed ({e}); start vLLM with "
                          f"VLLM_SERVER_DEV_MODE=1, or give a LoRA run (its adapter is loaded at run time)") from None


def check_eval_server(url: str, served_model: str | None, student: str, lora: bool) -> None:
    """A training config's ``eval.server``, before training: it answers (as ``served_model``), and for a LoRA run
    it serves the run's base, which its adapter is loaded on."""
    try:
        info = Server(url, served_model).info()
    except ServedError as e:
        raise ServedError(f"eval.server: {e}") from None
    root = info.get("root")
    if lora and root and Path(root).is_dir() and Path(student).is_dir() and not same_files(root, student):
        raise ServedError(f"eval.server: {url} serves {root}, but a LoRA run's adapter is loaded on its base "
                          f"{student}: start the server with --model {student}")


def _check_adapter_base(adapter: Path, root: str | None) -> None:
    """An adapter trained on another base than the server's would answer as a model nobody trained."""
    base = json.loads((adapter / ADAPTER_FILE).read_text()).get("base_model_name_or_path")
    if base and root and Path(base).is_dir() and Path(root).is_dir() and not same_files(base, root):
        raise ServedError(f"--server serves {root}, but {adapter} was trained on {base}: start the server with "
                          f"--model {base}")


def stop_ids(candidate: Path, tokenizer: Any) -> list[int]:
    """The ids that end an answer, as the local path reads them: the generation config's EOS (of the candidate,
    or of an adapter's base), else the tokenizer's."""
    from transformers import GenerationConfig

    adapter = adapter_dir(candidate)
    where = candidate
    if adapter is not None:
        where = Path(json.loads((adapter / ADAPTER_FILE).read_text()).get("base_model_name_or_path") or adapter)
    eos = None
    if (where / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(str(where)).eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return sorted({int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None})
