"""kdkit.util.threads: the OpenMP environment is set before torch starts, from the cores a process may use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kdkit.util import threads


def test_the_default_is_sleeping_waiters_and_a_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "cores_available", lambda: 8)
    monkeypatch.setattr(threads, "busy", lambda: True)
    env: dict[str, str] = {}
    threads.configure(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "8"}
    env = {"LOCAL_WORLD_SIZE": "4"}  # four processes of one launch share the eight cores
    threads.configure(env)
    assert env["OMP_NUM_THREADS"] == "2"
    env = {"LOCAL_WORLD_SIZE": "16"}
    threads.configure(env)
    assert env["OMP_NUM_THREADS"] == "1"  # at least one
    monkeypatch.setattr(threads, "busy", lambda: False)  # an idle machine: spinning waiters are faster
    env = {}
    threads.configure(env)
    assert env == {"OMP_NUM_THREADS": "8"}


def test_what_the_user_set_is_kept_and_kdkit_threads_overrides(monkeypatch):
    monkeypatch.setattr(threads, "cores_available", lambda: 8)
    monkeypatch.setattr(threads, "busy", lambda: True)
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    threads.configure(env)
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    env = {"KDKIT_THREADS": "5", "OMP_NUM_THREADS": "3"}
    threads.configure(env)
    assert env["OMP_NUM_THREADS"] == "5" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"KDKIT_THREADS": "torch"}
    threads.configure(env)
    assert env == {"KDKIT_THREADS": "torch"}  # torch's defaults, untouched
    with pytest.raises(SystemExit, match="KDKIT_THREADS='0'"):
        threads.configure({"KDKIT_THREADS": "0"})


def test_a_process_that_imports_kdkit_first_runs_that_many_threads():
    assert threads.cores_available() == len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    code = "import kdkit, torch; print(torch.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "KDKIT_THREADS": "1"}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[0] == "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(len(os.sched_getaffinity(0)))


def test_busy_means_another_runnable_task_in_every_look(monkeypatch):
    import builtins
    import io

    looks = iter(["0.5 0.4 0.3 2/300 99\n", "0.5 0.4 0.3 3/300 99\n", "0.5 0.4 0.3 2/300 99\n"])
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: io.StringIO(next(looks)) if p == "/proc/loadavg"
                        else real_open(p, *a, **k))
    assert threads.busy()  # another task was runnable in each of the three looks
    looks = iter(["0.5 0.4 0.3 2/300 99\n", "0.5 0.4 0.3 1/300 99\n", "0.5 0.4 0.3 2/300 99\n"])
    assert not threads.busy()  # one look saw this process alone: a passing task, not a competing job
    python = subprocess.Popen([sys.executable, "-c", "print('go', flush=True)\nwhile True: pass"],
                              stdout=subprocess.PIPE, text=True)
    try:
        monkeypatch.setattr(builtins, "open", real_open)
        assert python.stdout.readline() == "go\n"  # the competitor is in its busy loop
        assert threads.busy()
    finally:
        python.kill()
        python.wait()
