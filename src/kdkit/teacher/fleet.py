"""Several vLLM servers of one teacher, asked as one server.

A :class:`Fleet` answers what one :class:`~kdkit.teacher.served.Server` answers. Each request goes whole to an
idle server, and a server has one request at a time: each server then computes exactly the requests a lone
server would, one by one, so an answer does not depend on how many servers there are or which one gave it
(the servers are checked to agree on a few rows first). A server that stops answering — connection refused
or reset, time-outs or 5xx through all its retries — is reported and left out; its request goes to another.
Every :data:`REJOIN_S` seconds a request first asks each server left out whether it answers again (its
``/health`` within :data:`HEALTH_S` seconds, then what it serves): one that says what it said before and
answers the fleet's parity rows as the first server did takes requests again (a restarted server), which the
log says; one that answers otherwise stays out, named with why. A request fails only when no server is left;
one that a server refuses (a 4xx: the request's fault) fails at once, as it would on any of them.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kdkit.teacher.served import ServedError, Server, Unreachable
from kdkit.util.identity import digest

IDENTITY = ("model", "root", "max_model_len", "vllm_version", "max_logprobs")
"""What every server of a fleet must say alike (a server's own URL aside)."""

REJOIN_S = 60.0
"""Seconds between two asks of a server left out whether it answers again."""

HEALTH_S = 5.0
"""How long that ask waits for the server's ``/health`` before it leaves the server out for another round."""


def url_list(url: str | Sequence[str]) -> list[str]:
    """A config's or a command line's ``url``: one URL, or a list of them."""
    return [url] if isinstance(url, str) else list(url)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def connect(url: str | Sequence[str], model: str | None = None, timeout_s: float = 120.0, retries: int = 3,
            log: Callable[[str], None] = _stderr) -> Server | Fleet:
    """The server at ``url``, or the fleet of a list of two or more."""
    servers = [Server(u, model, timeout_s, retries) for u in url_list(url)]
    return servers[0] if len(servers) == 1 else Fleet(servers, log)


def servers_of(server: Server | Fleet) -> list[Server]:
    """Each server behind ``server`` (itself when it is one)."""
    return list(server.servers) if isinstance(server, Fleet) else [server]


class Fleet:
    """Servers of one teacher; see the module's docstring. ``log`` reports a server left out."""

    def __init__(self, servers: Sequence[Server], log: Callable[[str], None] = _stderr,
                 rejoin_s: float = REJOIN_S) -> None:
        if not servers:
            raise ServedError("a fleet of teacher servers needs at least one URL")
        self.servers = list(servers)
        roots = [s.url for s in self.servers]
        twice = next((r for i, r in enumerate(roots) if r in roots[:i]), None)
        if twice is not None:
            raise ServedError(f"teacher server {twice} is named twice (a server has one request at a time: "
                              "name each once)")
        self.log = log
        self.left_out: dict[str, str] = {}  # URL → why
        self.rejoin_s = rejoin_s
        self._asked_at: dict[str, float] = {}  # URL left out → when it was left out or last asked again
        self.parity: tuple[list[list[int]], int, float, list[Any]] | None = None  # set by agreement()
        self.answered = dict.fromkeys((s.url for s in self.servers), 0)  # URL → requests it answered
        self._idle = list(self.servers)
        self._cond = threading.Condition()
        self._info: dict[str, Any] | None = None

    @property
    def url(self) -> str:
        return ", ".join(s.url for s in self.servers)

    @property
    def width(self) -> int:
        """How many requests the fleet answers at once."""
        return len(self.servers)

    @property
    def model(self) -> str | None:
        return self.servers[0].model

    def info(self) -> dict[str, Any]:
        """What the servers serve, the same on each (:data:`IDENTITY`); a server that says otherwise than the
        first, or does not answer, is refused by its URL."""
        if self._info is None:
            said = []
            for s in self.servers:
                s.max_logprobs()
                said.append(s.info())
            diff = identity_difference([(s.url, i) for s, i in zip(self.servers, said, strict=True)])
            if diff is not None:
                raise ServedError(diff)
            self._info = {**said[0], "url": self.url}
        return self._info

    def max_logprobs(self) -> int | None:
        return self.info()["max_logprobs"]

    def refusal(self, top_k: int, temperature: float, longest: int) -> tuple[str, str] | None:
        self.info()
        return self.servers[0].refusal(top_k, temperature, longest)

    def prompt_topk(self, prompts: list[list[int]], k: int) -> list[Any]:
        return self._ask("prompt_topk", prompts, k)

    def token_logprobs(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        return self._ask("token_logprobs", prompts)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, stop_ids: list[int]) -> list[list[int]]:
        return self._ask("generate", prompts, max_new_tokens, temperature, top_p, seed, stop_ids)

    def tokenize(self, text: str | None = None, messages: list[dict[str, Any]] | None = None,
                 add_generation_prompt: bool = False, tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self._ask("tokenize", text, messages, add_generation_prompt, tools)

    def _ask(self, method: str, *args: Any) -> Any:
        while True:
            self._rejoin_due()
            server = self._take()
            try:
                answer = getattr(server, method)(*args)
            except Unreachable as e:
                self._leave_out(server, e)
                continue
            except BaseException:
                self._give_back(server)
                raise
            self._give_back(server, answered=True)
            return answer

    def _take(self) -> Server:
        """An idle server, waiting for one while every server left is busy."""
        with self._cond:
            while not self._idle:
                if len(self.left_out) == len(self.servers):
                    why = "; ".join(f"{u}: {w}" for u, w in self.left_out.items())
                    raise ServedError(f"no teacher server answers ({why})")
                self._cond.wait()
            return self._idle.pop(0)

    def tally(self) -> str:
        """How the requests were spread, for a log: ``requests answered: http://a 5, http://b 4``."""
        return "requests answered: " + ", ".join(f"{u} {n}" for u, n in self.answered.items())

    def _give_back(self, server: Server, answered: bool = False) -> None:
        with self._cond:
            self.answered[server.url] += answered
            self._idle.append(server)
            self._cond.notify()

    def _leave_out(self, server: Server, e: Unreachable) -> None:
        with self._cond:
            self.left_out[server.url] = e.reason
            self._asked_at[server.url] = time.monotonic()
            left = len(self.servers) - len(self.left_out)
            self._cond.notify_all()  # a waiter must see when none is left
        where = f"its requests go to the {left} left" if left else "none is left"
        self.log(f"teacher server {server.url} stopped answering ({e.reason}); {where}")

    def _rejoin_due(self) -> None:
        """Each server left out and not asked for :attr:`rejoin_s` seconds is asked whether it answers again
        (one caller asks it; the others go on): it takes requests again when :meth:`_refusal` finds nothing."""
        now = time.monotonic()
        with self._cond:
            due = [s for s in self.servers if s.url in self.left_out and now - self._asked_at[s.url] >= self.rejoin_s]
            self._asked_at.update(dict.fromkeys((s.url for s in due), now))
        for server in due:
            refused = self._refusal(server)
            if refused is None:
                with self._cond:
                    del self.left_out[server.url]
                    self._idle.append(server)
                    self._cond.notify()
                self.log(f"teacher server {server.url} answers again, as before; it takes requests again")
            elif refused:
                self.log(f"teacher server {server.url} answers again but stays out: {refused}")

    def _refusal(self, server: Server) -> str | None:
        """Why ``server``, left out, may not take requests again, as a sentence: "" while it does not answer;
        what it says otherwise than the fleet's first server (:data:`IDENTITY`), or how its answers to the
        parity rows of :func:`agreement` differ from the first server's. None: it may."""
        if not server.alive(HEALTH_S):
            return ""
        probe = Server(server.url, server.model, server.timeout_s, retries=0)
        try:
            probe.max_logprobs()
            if self._info is not None:
                differs = identity_difference([(self.servers[0].url, self._info), (server.url, probe.info())])
                if differs is not None:
                    return differs
            if self.parity is not None:
                prompts, k, tolerance, ref = self.parity
                differs = topk_difference(ref, probe.prompt_topk(prompts, k), tolerance)[2]
                if differs is not None:
                    return f"teacher server {server.url} answers otherwise than {self.servers[0].url} on {differs}"
        except Unreachable:
            return ""
        except ServedError as e:
            return str(e)
        return None


def share(server: Server | Fleet, rank: int, world: int, log: Callable[[str], None]) -> Server | Fleet:
    """Rank ``rank`` of ``world`` processes capturing one cache: its own servers, ``servers[rank::world]``, when
    there are at least as many servers as ranks (then no server is asked by two processes at once, and the
    bytes are those of one process asking the whole fleet); else every server, shared, which the log says."""
    servers = servers_of(server)
    if world <= 1:
        return server
    if len(servers) < world:
        log(f"{len(servers)} teacher server(s) for {world} ranks: the ranks share them (a server may batch two "
            "ranks' requests together; give at least one server per rank for one process's bytes)")
        return server
    own = servers[rank::world]
    return own[0] if len(own) == 1 else Fleet(own, log)


def identity_difference(said: list[tuple[str, dict[str, Any]]]) -> str | None:
    """The first field of :data:`IDENTITY` on which a server says otherwise than the first, as a sentence
    naming both servers (None: they say alike). ``said``: (URL, what its ``info()`` says) per server."""
    (first, ref), *rest = said
    for url, theirs in rest:
        for key in IDENTITY:
            if theirs.get(key) != ref.get(key):
                return (f"teacher server {url} serves {key} {theirs.get(key)!r}, {first} {ref.get(key)!r}: the "
                        "servers of one teacher must serve the same model the same way")
    return None


def agreement(server: Server | Fleet, prompts: list[list[int]], k: int, tolerance: float) -> None:
    """Ask each server of a fleet for the top-K of the same prompts; refuse one whose log-probs differ from
    the first server's by more than ``tolerance`` (or whose top-1 differs beyond a tie), naming it. Then the
    fleet's log says whether they agree bit for bit (the bytes written cannot depend on which server answered
    which rows) or within the tolerance only, and the fleet keeps the rows and the first server's answers to
    ask again of a server that returns. One server: nothing to compare."""
    if not isinstance(server, Fleet):
        return
    servers = server.servers
    ref = servers[0].prompt_topk(prompts, k)
    worst, exact = 0.0, True
    for s in servers[1:]:
        delta, same, differs = topk_difference(ref, s.prompt_topk(prompts, k), tolerance)
        if differs is not None:
            raise ServedError(f"teacher server {s.url} answers otherwise than {servers[0].url} on {differs}")
        worst, exact = max(worst, delta), exact and same
    server.parity = (prompts, k, tolerance, ref)
    n = len(servers)
    server.log(f"{n} teacher servers agree bit for bit on {len(prompts)} rows" if exact else
               f"{n} teacher servers agree within {tolerance:g} on {len(prompts)} rows but not bit for bit (max "
               f"|Δ| {worst:.3g}): the bytes written depend on which server answers which rows")


def topk_difference(ref: list[Any], theirs: list[Any], tolerance: float) -> tuple[float, bool, str | None]:
    """Two servers' top-K answers to the same rows: the largest |Δ log-prob| over finite entries, whether they
    are equal bit for bit, and the first row that differs by more than ``tolerance`` or in its top-1 token
    beyond a tie, as ``parity row 2: max |Δ log-prob| ...`` (None: no row does)."""
    worst, exact = 0.0, True
    for row, (a, b) in enumerate(zip(ref, theirs, strict=True)):
        finite = torch.isfinite(a.logprobs) & torch.isfinite(b.logprobs)
        delta = float((a.logprobs - b.logprobs).abs().where(finite, torch.zeros(())).max())
        tie = ((a.logprobs[:, 0] - a.logprobs[:, 1]).abs() <= tolerance if a.ids.shape[-1] > 1
               else torch.zeros_like(a.ids[:, 0], dtype=torch.bool))
        top1 = bool(((a.ids[:, 0] == b.ids[:, 0]) | tie).all())
        if delta > tolerance or not top1:
            return delta, False, (f"parity row {row + 1}: max |Δ log-prob| {delta:.3g} (tolerance {tolerance:g})"
                                  + ("" if top1 else ", another top-1 token"))
        exact = exact and torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
        worst = max(worst, delta)
    return worst, exact, None


def served_identity(url: str | list[str], model: str | None, field: str) -> dict[str, Any]:
    """A served teacher's identity for :func:`kdkit.util.identity.run_inputs`: what its server — every server
    of a list, alike — says it serves (a resume refuses a server serving another model, another context
    length, another vLLM or another --max-logprobs; not other URLs, nor another number of servers)."""
    server = connect(url, model)
    try:
        server.max_logprobs()
        said = {k: str(v) for k, v in server.info().items() if k != "url"}
    except ServedError as e:
        raise ServedError(f"{field}: {e}") from None
    return {"sha256": digest(said), "files": said}
