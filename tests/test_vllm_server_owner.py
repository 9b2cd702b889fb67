"""The examples' and tests' vLLM server helper: a server runs in its own session, so its owner must stop it on
SIGTERM too, not only on a normal exit (a killed example once left its server and its kdkit child running)."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.vllm_server import ROOT

OWNER = """
import subprocess, sys
from tests.vllm_server import stop_on_sigterm
stop_on_sigterm()
child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
try:
    print(child.pid, flush=True)  # inside the try: a SIGTERM from here on meets the cleanup
    subprocess.run([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
finally:
    child.kill()  # what a with-block's __exit__ does for the server
    child.wait()
    print("cleaned", flush=True)
"""


def test_sigterm_to_the_owner_runs_its_cleanup_and_stops_its_children():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    child = int(owner.stdout.readline())
    owner.send_signal(signal.SIGTERM)
    rest = owner.stdout.read()
    assert owner.wait(timeout=60) == 128 + signal.SIGTERM
    assert rest.strip() == "cleaned"
    assert subprocess.run(["ps", "-p", str(child)], capture_output=True).returncode == 1  # gone, reaped


def test_an_owner_that_set_its_own_handler_keeps_it():
    code = ("import signal; from tests.vllm_server import stop_on_sigterm; h = lambda *a: None; "
            "signal.signal(signal.SIGTERM, h); stop_on_sigterm(); print(signal.getsignal(signal.SIGTERM) is h)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip() == "True"
