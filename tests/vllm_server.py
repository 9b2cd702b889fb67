"""A real vLLM server on 127.0.0.1 for the served-teacher tests, from the environment `make vllm-env` creates.

Without that environment the tests skip, except under ``KDKIT_REQUIRE_VLLM=1`` (``make test``, CI), where they
fail: the served path is then always exercised.
"""

from __future__ import annotations

import os
import socket
import subprocess
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


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` as README's 'A served teacher' starts it."""

    def __init__(self, model: Path, log: Path, port: int | None = None, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> None:
        self.model, self.log, self.port, self.extra, self.env = model, log, port or free_port(), extra, env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> VllmServer:
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
