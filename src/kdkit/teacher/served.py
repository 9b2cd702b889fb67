"""A teacher served by vLLM, spoken to over its OpenAI-compatible HTTP API; kdkit never imports vllm.

What kdkit asks of a server: ``/v1/models`` (what it serves), ``/tokenize`` (its tokenizer and chat
template, for the parity check), and ``/v1/completions`` with ``prompt_logprobs`` (the top-K log-probs
under the full softmax at every prompt position, ``return_tokens_as_token_ids`` so that tokens come back
as ids) or with ``logprobs`` (a rollout's own tokens). Prompts are sent as token ids, so the server never
re-tokenises text. A request that fails to connect, times out or gets a 5xx is retried with backoff; a
4xx is the request's fault and is reported at once with the server's message.

A URL is the server's root (``http://HOST:PORT``) or its OpenAI base URL (``http://HOST:PORT/v1``, as vLLM's
and OpenAI's clients take it); both name the same server. An answer that is not what vLLM returns (HTML, a
JSON string, an object without the field asked for) is refused in one line naming the URL, the endpoint
and what was missing.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from kdkit.loss.divergences import TopK
from kdkit.util.errors import KdkitError


class ServedError(KdkitError, RuntimeError):
    """The teacher server cannot be reached, refused a request, or does not serve what was asked for."""

    exit_code = 1


class Unreachable(ServedError):
    """A server that did not answer through all its retries (refused or reset connections, time-outs, 5xx):
    another server of the same teacher may answer the same request."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _token_id(key: str) -> int:
    """``"token_id:123"`` (``return_tokens_as_token_ids``) or ``"123"`` (a JSON object's key) → 123."""
    return int(key.rsplit(":", 1)[-1])


def server_root(url: str) -> str:
    """The server's root for a URL given as its root or as its OpenAI base URL: ``http://h:8000/v1/`` →
    ``http://h:8000``."""
    url = url.strip().rstrip("/")
    return url[:-len("/v1")] if url.endswith("/v1") else url


class _Text(str):
    """A body that is not JSON (e.g. "Success: LoRA adapter ... added", or a proxy's HTML page)."""


def _kind(value: Any) -> str:
    """What an answer is, for a message: ``a JSON string``, ``text starting '<html>...'``."""
    if isinstance(value, _Text):
        return f"text starting {value.strip()[:40]!r}" if value.strip() else "an empty body"
    names = {str: "a JSON string", dict: "a JSON object", list: "a JSON list", type(None): "an empty body",
             bool: "a JSON boolean"}
    return names.get(type(value), f"a JSON {type(value).__name__}")


@dataclass
class Server:
    """One vLLM server. ``model``: the name it must serve (checked by :meth:`info`); None takes its only one."""

    url: str
    model: str | None = None
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 1.0
    _info: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        given, self.url = self.url, server_root(self.url)
        if not self.url.startswith(("http://", "https://")):
            raise ServedError(f"server URL {given!r}: expected http://HOST:PORT or http://HOST:PORT/v1")

    def _object(self, path: str, body: dict[str, Any] | None = None, *, needs: tuple[str, ...] = ()) -> dict[str, Any]:
        """The answer to ``path``, which must be a JSON object holding each field of ``needs``."""
        answer = self._request(path, body)
        if not isinstance(answer, dict):
            raise ServedError(f"server {self.url}{path} answered with {_kind(answer)}, not vLLM's JSON object "
                              f"(is {self.url} a vLLM server?)")
        missing = [k for k in needs if k not in answer]
        if missing:
            raise ServedError(f"server {self.url}{path} answered without {', '.join(map(repr, missing))} "
                              f"(fields: {sorted(answer)[:8]}); is {self.url} a vLLM server?")
        return answer

    @contextmanager
    def _reading(self, path: str, what: str) -> Iterator[None]:
        """Parsing a nested answer: a field of the wrong type or a missing one is the server's, named once."""
        try:
            yield
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            detail = f"no {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
            raise ServedError(f"server {self.url}{path}: its {what} is not what vLLM returns ({detail})") from None

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        last = ""
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    return _Text(raw.decode(errors="replace"))
            except urllib.error.HTTPError as e:
                message = _server_message(e)
                if e.code < 500:
                    raise ServedError(f"teacher server {self.url}{path} refused the request ({e.code}): "
                                      f"{message}") from None
                last = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = str(getattr(e, "reason", e))
            except http.client.HTTPException as e:  # the connection ended mid-answer (a server that died)
                last = f"{type(e).__name__}: the answer ended before it was whole"
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2 ** attempt)
        raise Unreachable(f"teacher server {self.url} did not answer {path} after {self.retries + 1} tries "
                          f"({last}); is it running? (start it as the docs' 'A served teacher' says)", last)

    def alive(self, timeout_s: float) -> bool:
        """Whether the server answers ``/health`` within ``timeout_s`` seconds, in one try (a running vLLM
        server answers it at once; a hung one does not hold the caller for its full time-out)."""
        try:
            Server(self.url, self.model, timeout_s, retries=0)._request("/health")
        except ServedError:
            return False
        return True

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``path`` (retried like every request); the server's answer, parsed when JSON."""
        return self._request(path, body)

    def info(self) -> dict[str, Any]:
        """What the server says it serves: model name, root, max_model_len, vLLM version. Refuses a server
        that does not serve ``model``, or serves several base models (not counting LoRA adapters) and none was
        named."""
        if self._info is not None:
            return self._info
        served = self._object("/v1/models", needs=("data",))["data"]
        with self._reading("/v1/models", "model list"):
            names = [m["id"] for m in served]
            bases = [m for m in served if not m.get("parent")]  # LoRA adapters loaded at run time name a parent
        if self.model is None and len(bases) != 1:
            raise ServedError(f"teacher server {self.url} serves {names}; name one (--served-model / teacher.served_model)")
        chosen = bases[0] if self.model is None else next((m for m in served if m.get("id") == self.model), None)
        if chosen is None:
            raise ServedError(f"teacher server {self.url} serves {names}, not {self.model!r} "
                              f"(--served-model / teacher.served_model)")
        try:
            version = self._object("/version").get("version")
        except ServedError:
            version = None  # optional: older servers have no /version
        self.model = chosen["id"]
        self._info = {"url": self.url, "model": chosen["id"], "root": chosen.get("root"),
                      "max_model_len": chosen.get("max_model_len"), "vllm_version": version}
        return self._info

    def max_logprobs(self) -> int | None:
        """The server's ``--max-logprobs``, read from its refusal of a larger request (None: not stated)."""
        if "max_logprobs" not in self.info():
            try:
                self._completions([[0, 0]], max_tokens=1, prompt_logprobs=1 << 30)
                self._info["max_logprobs"] = None
            except ServedError as e:
                found = re.search(r"max allowed: (\d+)", str(e))
                self._info["max_logprobs"] = int(found.group(1)) if found else None
        return self._info["max_logprobs"]

    def refusal(self, top_k: int, temperature: float, longest: int) -> tuple[str, str] | None:
        """The first thing this server cannot answer for a capture or a run, as (what, why), ``what`` one of
        ``temperature``, ``top_k``, ``max_length``; None when it can answer all."""
        if temperature != 1.0:
            return "temperature", "vLLM returns prompt log-probs at temperature 1 (a top-K cannot be re-tempered)"
        limit = self.max_logprobs()
        if limit is not None and top_k > limit:
            return "top_k", f"the server at {self.url} allows --max-logprobs {limit} (restart it with a larger one)"
        context = self.info()["max_model_len"]
        if context is not None and longest > context:
            return "max_length", f"a row of {longest} tokens exceeds the server's max_model_len {context}"
        return None

    def _completions(self, prompts: list[list[int]], **extra: Any) -> list[dict[str, Any]]:
        body = {"model": self.model or self.info()["model"], "prompt": prompts, "return_tokens_as_token_ids": True, **extra}
        choices = self._object("/v1/completions", body, needs=("choices",))["choices"]
        with self._reading("/v1/completions", "choices"):
            if len(choices) != len(prompts):
                raise ServedError(f"teacher server {self.url}: {len(choices)} answers for {len(prompts)} prompts")
            return sorted(choices, key=lambda c: c["index"])

    def prompt_topk(self, prompts: list[list[int]], k: int) -> list[TopK]:
        """For each prompt of L ids: TopK[L-1, K] (float32) — at prediction position j, the K most likely
        next tokens and their log-probs under the full softmax at temperature 1, sorted by log-prob, and
        the log tail mass log(1 − Σ_K p)."""
        if any(len(p) < 2 for p in prompts):
            raise ServedError("a prompt of fewer than 2 tokens has no prediction position")
        choices = self._completions(prompts, max_tokens=1, temperature=0.0, prompt_logprobs=k)
        with self._reading("/v1/completions", "prompt_logprobs"):
            return [_topk_of(c.get("prompt_logprobs") or [], k, len(p), self.url)
                    for c, p in zip(choices, prompts, strict=True)]

    def token_logprobs(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """For each prompt of L ids: float32 [L-1], the log-prob of token j+1 given tokens 0..j."""
        choices = self._completions(prompts, max_tokens=1, temperature=0.0, prompt_logprobs=1)
        out = []
        with self._reading("/v1/completions", "prompt_logprobs"):
            for c, p in zip(choices, prompts, strict=True):
                entries = (c.get("prompt_logprobs") or [])[1:]
                lps = [float(_entry(e, tok)["logprob"]) for e, tok in zip(entries, p[1:], strict=True)]
                out.append(torch.tensor(lps, dtype=torch.float32))
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, stop_ids: list[int]) -> list[list[int]]:
        """Each prompt's completion as token ids (the stop token included when one ended it)."""
        choices = self._completions(prompts, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    seed=seed, logprobs=0, stop_token_ids=stop_ids, skip_special_tokens=False)
        with self._reading("/v1/completions", "logprobs.tokens"):
            return [[_token_id(t) for t in (c.get("logprobs") or {})["tokens"]] for c in choices]

    def tokenize(self, text: str | None = None, messages: list[dict[str, Any]] | None = None,
                 add_generation_prompt: bool = False, tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The server's token ids for ``text`` (no special tokens added), or for ``messages`` (and ``tools``)
        rendered by the server's chat template."""
        body: dict[str, Any] = {"model": self.info()["model"]}
        if messages is not None:
            body.update(messages=messages, add_generation_prompt=add_generation_prompt,
                        **({"tools": tools} if tools else {}))
        else:
            body.update(prompt=text, add_special_tokens=False)
        tokens = self._object("/tokenize", body, needs=("tokens",))["tokens"]
        with self._reading("/tokenize", "tokens"):
            if not all(type(t) is int for t in tokens):
                raise ValueError("expected a list of integer ids")
            return list(tokens)


def _server_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
    except (json.JSONDecodeError, OSError):
        return e.reason or ""
    err = body.get("error", body) if isinstance(body, dict) else body
    return str(err.get("message", err) if isinstance(err, dict) else err)


def _entry(entries: dict[str, Any], token: int) -> dict[str, Any]:
    for key, value in entries.items():
        if _token_id(key) == token:
            return value
    raise ServedError(f"the server's prompt log-probs lack the prompt's own token {token}")


def _topk_of(positions: list[Any], k: int, length: int, url: str) -> TopK:
    """The K highest-ranked entries of each position (vLLM adds the prompt's own token when it ranks
    below K), sorted by log-prob, ties by id."""
    if len(positions) != length:
        raise ServedError(f"teacher server {url}: {len(positions)} prompt log-prob entries for {length} tokens")
    ids = torch.zeros((length - 1, k), dtype=torch.long)
    lps = torch.full((length - 1, k), -math.inf, dtype=torch.float32)
    for j, entries in enumerate(positions[1:]):
        ranked = sorted(((v["logprob"], _token_id(key)) for key, v in entries.items() if v.get("rank", 1) <= k),
                        key=lambda t: (-t[0], t[1]))[:k]
        for slot, (lp, tok) in enumerate(ranked):
            ids[j, slot], lps[j, slot] = tok, lp
    tail = torch.log1p(-torch.exp(lps.double()).sum(-1).clamp(max=1.0)).float()  # 1 − Σ_K p, in float64
    return TopK(ids=ids, logprobs=lps, tail=tail)

