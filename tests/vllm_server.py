"""A real vLLM server on 127.0.0.1 for the served-teacher tests, from the environment `make vllm-env` creates.

Without that environment the tests skip, except under ``KDKIT_REQUIRE_VLLM=1`` (``make test``, CI), where they
fail: the served path is then always exercised.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 300  # a tiny model loads in ~30 s on 2 idle cores; a busy machine takes longer


def vllm_python() -> Path | None:
    p = Path(os.environ.get("KDKIT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    return p if p.is_file() else None


def require_vllm() -> Path:
    py = vllm_python()
    if py is None:
        if os.environ.get("KDKIT_REQUIRE_VLLM") == "1":
            pytest.fail("the vLLM environment is missing: run `make vllm-env` (make test creates it)")
        pytest.skip("no vLLM environment (make vllm-env)")
    return py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LORA = (("--enable-lora", "--max-lora-rank", "8"), {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
"""A server that loads a LoRA student's adapter at run time."""
DEV = ((), {"VLLM_SERVER_DEV_MODE": "1"})
"""A server whose weights a fully fine-tuned student reloads in place (/collective_rpc, /reset_prefix_cache)."""


def stop_on_sigterm() -> None:
    """For a script that starts servers (an example, a benchmark): SIGTERM to it (``kill PID``, a scheduler's
    stop) raises SystemExit, so that ``with`` blocks and ``finally`` run: a server, in its own session, is stopped
    instead of outliving its owner, and a kdkit child run by ``subprocess.run`` is killed. Only from the main
    thread, and only where no handler is set already (not under pytest: it would turn a stop into a failure)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` as the docs' 'A served teacher' starts it."""

    def __init__(self, model: Path, log: Path, port: int | None = None, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.model, self.log, self.port, self.extra, self.env = model, log, port or free_port(), extra, env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> VllmServer:
        return self.launch().wait()

    def launch(self) -> VllmServer:
        """Start the process and return at once: servers launched together load side by side."""
        cmd = [str(require_vllm()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
               "--dtype", "float32", "--max-logprobs", "64", "--enforce-eager", "--host", "127.0.0.1",
               "--port", str(self.port), *self.extra]
        # the server is another program on its own kernels: a client test's ATEN_CPU_CAPABILITY (default: no
        # vector kernels) is not passed to vLLM's CPU backend, which does not start under it
        base = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        env = {**base, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               **self.env}
        env.pop("PYTHONPATH", None)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def wait(self) -> VllmServer:
        """Return once the server answers /health; raise with its log when it exits or never answers."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.proc.returncode}); its log: {self.log}\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return self
            except OSError:
                time.sleep(0.5)  # polling a server that is starting, not a timing assertion
        self.stop()
        raise RuntimeError(f"vLLM did not answer /health within {STARTUP_S} s; its log: {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc = None


class Relay:
    """A TCP relay in front of a server, on a port of its own. ``stop()`` ends it as a killed server process
    ends — open connections are reset, and so is every new one — and ``start()`` brings it back on the same
    port, so a test can see a server die and return without paying another vLLM start-up. The port stays bound
    for the relay's life: reopening a closed port can fail (EADDRINUSE) while the kernel still holds it."""

    def __init__(self, target: str, dies_at: int | None = None, counting: bytes = b"") -> None:
        """``dies_at``: the relay stops by itself when its ``dies_at``-th connection comes whose request starts
        with ``counting`` (each HTTP request of kdkit's is one connection; b"POST /v1/completions" counts the
        log-prob requests alone), mid-run as a killed server does."""
        self.target = target.rsplit(":", 1)
        self.dies_at, self.counting, self.connections = dies_at, counting, 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._down = False

    def start(self) -> Relay:
        with self._lock:
            self._down = False
        if self._listener is None:
            self._listener = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            counted = not self.counting or _starts(client, self.counting)
            with self._lock:
                self.connections += counted
                dying = counted and self.dies_at is not None and self.connections >= self.dies_at
            if dying:
                self.stop()
            with self._lock:
                down = self._down
            if down:  # a dead server: the connection is reset
                _reset(client)
                continue
            client.settimeout(None)
            try:
                upstream = socket.create_connection((self.target[0].split("//")[-1], int(self.target[1])))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._down:  # it died while this connection was being made
                    _reset(client)
                    _reset(upstream)
                    continue
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self) -> None:
        with self._lock:
            self._down = True
            sockets, self._open = self._open, set()
        for s in sockets:
            _reset(s)


def _starts(client: socket.socket, prefix: bytes) -> bool:
    """Whether the request on ``client`` starts with ``prefix`` (read without taking it from the stream)."""
    try:
        client.settimeout(30)
        return client.recv(len(prefix), socket.MSG_PEEK | socket.MSG_WAITALL).startswith(prefix)
    except OSError:
        return False


def _reset(s: socket.socket) -> None:
    """Close with a reset, as the kernel does for a killed process's connections."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
