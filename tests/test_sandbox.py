"""The sandbox: hostile programs end as failed verdicts and leak nothing; it fails closed."""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest

from kdkit.evaluate import sandbox
from kdkit.evaluate.sandbox import Limits, SandboxUnavailable, leftover_processes, run_programs

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed (make sandbox-deps)")
FAST = Limits(timeout_s=3.0, memory_mb=512, output_bytes=256 * 1024)


@pytest.fixture(scope="module")
def host_secret(tmp_path_factory):
    d = tmp_path_factory.mktemp("secret")
    p = d / "id_rsa"
    p.write_text("SECRET-KEY-MATERIAL")
    return p


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(conn.recv(100))
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


def _hostile(host_secret: Path, port: int, out_targets: list[Path]) -> dict[str, str]:
    """Each program exits 0 only if its attack worked."""
    targets = ", ".join(repr(str(t)) for t in out_targets)
    return {
        "read_secret_file": f"s = open({str(host_secret)!r}).read()\nprint(s)\nassert 'SECRET' in s\n",
        "read_ssh_dir": "import os\nprint(os.listdir(os.path.expanduser('/root/.ssh')))\n",
        "read_project": f"print(open({str(Path(__file__).resolve())!r}).read()[:50])\n",
        "env_secret": "import os\nassert os.environ.get('KDKIT_TEST_SECRET', '')[::-1] == '2retnuh', dict(os.environ)\n",
        "host_proc_environ": "print(open('/proc/1/environ','rb').read())\nassert b'KDKIT_TEST_SECRET' in "
                             "open('/proc/1/environ','rb').read()\n",
        "write_outside": f"for t in [{targets}]:\n    open(t, 'w').write('pwned')\n",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n",
        "network_external": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n",
        "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
        "memory_bomb": "x = bytearray(8 * 1024 ** 3)\n",
        "cpu_spin": "while True:\n    pass\n",
        "sleep": "import time\ntime.sleep(60)\n",
        "stdout_flood": "while True:\n    print('x' * 10000)\n",
        "orphan_child": f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(8)\n"
                        f"    open({str(out_targets[0])!r}, 'w').write('late')\n    os._exit(0)\n"
                        "raise SystemExit(1)\n",
        "ctypes_setuid": "import ctypes\nassert ctypes.CDLL(None).setuid(0) == 0\n",
        "ctypes_segfault": "import ctypes\nctypes.string_at(0)\n",
        "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
                       "raise SystemExit(1)\n",
    }


@needs_bwrap
def test_hostile_suite_fails_and_leaks_nothing(host_secret, listener, tmp_path, monkeypatch):
    port, hits = listener
    monkeypatch.setenv("KDKIT_TEST_SECRET", "hunter2")
    targets = [Path(__file__).resolve().parent / "PWNED", tmp_path / "pwned", Path("/usr/lib/kdkit-pwned")]
    cases = _hostile(host_secret, port, targets)
    results = run_programs(list(cases.values()), limits=FAST, workers=4)
    verdicts = dict(zip(cases, results, strict=True))
    for name, r in verdicts.items():
        assert not r.passed, f"{name}: {r.status} {r.stdout_tail[-200:]}"
        assert "SECRET-KEY-MATERIAL" not in r.stdout_tail + r.stderr_tail, name
        assert "hunter2" not in r.stdout_tail + r.stderr_tail, name
    assert verdicts["memory_bomb"].status == "oom"
    assert verdicts["cpu_spin"].status == "timeout"
    assert verdicts["sleep"].status == "timeout"
    assert verdicts["sleep"].duration_s < 10
    assert len(verdicts["stdout_flood"].stdout_tail) <= FAST.stderr_tail
    assert hits == []
    assert not any(t.exists() for t in targets)
    assert leftover_processes() == []


@needs_bwrap
def test_timeout_is_reported_as_timeout_not_failed():
    (r,) = run_programs(["import time\ntime.sleep(30)\n"], limits=Limits(timeout_s=1.0))
    assert r.status == "timeout"
    (f,) = run_programs(["assert 1 == 2\n"], limits=FAST)
    assert f.status == "failed"
    (e,) = run_programs(["undefined_name\n"], limits=FAST)
    assert e.status == "error" and "NameError" in e.stderr_tail


@needs_bwrap
def test_sandbox_sees_only_its_own_files():
    prog = "import os\nprint(sorted(os.listdir('/')))\nprint(os.getcwd(), os.getuid() != 0)\n"
    (r,) = run_programs([prog], limits=FAST)
    assert r.passed, r.stderr_tail
    assert "'work'" not in r.stdout_tail and "'home'" not in r.stdout_tail and "'etc'" not in r.stdout_tail
    assert "/sandbox True" in r.stdout_tail


def test_fails_closed_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_probe_ok", {})
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_programs(["print(1)\n"], limits=FAST)
    # explicitly unsafe: runs, without isolation
    (r,) = run_programs(["print(1)\n"], limits=FAST, unsafe_no_isolation=True)
    assert r.passed and r.stdout_tail.strip() == "1"


def test_fails_closed_when_bubblewrap_cannot_start(monkeypatch):
    monkeypatch.setattr(sandbox, "_probe_ok", {})
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: "/usr/bin/bwrap")
    real = sandbox._bwrap_args
    monkeypatch.setattr(sandbox, "_bwrap_args", lambda *a: ["/nonexistent/bwrap"] + real(*a)[1:])
    with pytest.raises(SandboxUnavailable, match="does not start"):
        run_programs(["print(1)\n"], limits=FAST)


def test_environment_of_unsafe_mode_is_cleared(monkeypatch):
    monkeypatch.setenv("KDKIT_TEST_SECRET", "hunter2")
    (r,) = run_programs(["import os\nprint(sorted(os.environ))\n"], limits=FAST, unsafe_no_isolation=True)
    assert "KDKIT_TEST_SECRET" not in r.stdout_tail and r.passed
    assert os.environ["KDKIT_TEST_SECRET"] == "hunter2"


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="per-program uids need root (setpriv)")
def test_no_process_starts_and_a_thread_bomb_leaves_nothing_for_the_next_program_on_its_uid():
    # No process can start (the process filter); threads count against RLIMIT_NPROC, which stops a thread
    # bomb. One worker: the bomb and the next program run on the same slot, hence the same uid; the next
    # program needs 28 threads alive at once (with the harness's two: 30 of the 32 allowed).
    threads = ("import threading\nthreading.stack_size(256 * 1024)\ngo = threading.Event()\n"
               "ts = [threading.Thread(target=go.wait) for _ in range(28)]\nfor t in ts:\n    t.start()\n"
               "go.set()\nfor t in ts:\n    t.join()\nprint('ok')\n")
    bomb = ("import threading, time\nthreading.stack_size(256 * 1024)\n"
            "while True:\n    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    forker = "import os\nos.fork()\n"
    results = run_programs([bomb, threads, forker, threads], limits=FAST, workers=1)
    assert [r.passed for r in results] == [False, True, False, True], [r.stderr_tail[-300:] for r in results]
    assert "can't start new thread" in results[0].reason and "Operation not permitted" in results[2].reason
    assert leftover_processes() == []


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="per-program uids need root (setpriv)")
def test_each_kdkit_process_gets_its_own_sandbox_uids(tmp_path):
    import subprocess
    import sys

    mine = sandbox.uid_base()
    code = "from kdkit.evaluate import sandbox; print(sandbox.uid_base())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    theirs = int(other.stdout.strip())
    assert abs(theirs - mine) >= sandbox._BLOCK
    # a program reports the uid it ran as: one of this process's block
    r = run_programs(["import os\nprint(os.getuid())\n"], limits=FAST, workers=1)[0]
    assert mine <= int(r.stdout_tail.strip()) < mine + sandbox._BLOCK
