"""Isolated execution of untrusted, model-generated Python. Fails closed.

Each program runs

* under :mod:`kdkit.evaluate.harness`, which alone can report a pass: a line on a pipe, keyed by a fresh
  secret the program never sees (exit status, output and exceptions are never a pass);
* in ``/sandbox``, a size-bounded tmpfs (``Limits.disk_mb``; ``/tmp`` and ``/dev/shm`` likewise),
  the only writable place it sees, so a program that writes files fills its own space, not the host's;
* under bubblewrap: new PID, network, IPC, UTS (and cgroup) namespaces, a root
  made only of read-only ``/usr`` (plus the interpreter), a private ``/tmp``,
  its own ``/proc``, a cleared environment, a new session, killed with its parent;
* as an unprivileged uid (one per worker slot, via ``setpriv`` when kdkit runs as
  root: RLIMIT_NPROC does not apply to root), with no capabilities. Each kdkit
  process holds its own block of uids (a lock file per block), so two kdkit
  processes never share a uid, and a slot's uid is reused only after every
  process of the previous program is gone — a fork bomb cannot exhaust the next
  program's process limit, and no sandbox process outlives its result;
* under a seccomp filter (:mod:`kdkit.evaluate.procfilter`, loaded by bubblewrap) that refuses every new process
  (``fork``, ``vfork``, a non-thread ``clone``), ``ptrace`` and cross-process memory calls: no process
  without the harness's audit hook can exist beside it to read or write its memory;
* with ``python3 -I`` and rlimits on address space, CPU time, file size, open
  files and processes, and a wall-clock timeout that kills the whole process group;
* with stdout/stderr going to files capped by RLIMIT_FSIZE, of which only a tail is kept.

If bubblewrap is missing or cannot start, :class:`SandboxUnavailable` is raised
with install instructions. ``unsafe_no_isolation=True`` runs without namespaces
(rlimits and timeout only) and must be asked for explicitly.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kdkit.evaluate import procfilter
from kdkit.util.errors import KdkitError

STATUSES = ("passed", "failed", "exited", "timeout", "error", "oom")
INSTALL_HINT = "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install bubblewrap`)"
_UID_BASE = 61000
_BLOCK = 16  # uids per kdkit process: one per worker slot
_N_BLOCKS = 64
_REAP_TIMEOUT_S = 30.0
_HARNESS = Path(__file__).with_name("harness.py")
# Isolated, no .pyc written, and none read either (an empty cache prefix): imports compile from source,
# so the harness can refuse marshal.loads, the one way to run hand-made bytecode.
_PY_FLAGS = ("-I", "-B", "-X", "pycache_prefix=/nonexistent-kdkit-pycache")


class SandboxUnavailable(KdkitError, RuntimeError):
    """Isolation cannot be set up; nothing was run."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    output_bytes: int = 1 << 20
    max_files: int = 64
    max_procs: int = 32
    stderr_tail: int = 2000
    disk_mb: int = 64  # each of /sandbox, /tmp and /dev/shm (tmpfs: counted in memory, not on the host disk)


@dataclass(frozen=True)
class Program:
    """A program to verify: ``source``, then (for a task) ``test``, then ``check(entry_point)``.

    A plain program (no test) passes when its source runs to its end."""

    source: str
    test: str | None = None
    entry_point: str | None = None


@dataclass
class RunResult:
    status: str
    returncode: int | None
    stdout_tail: str
    stderr_tail: str
    duration_s: float
    reason: str = ""  # why it did not pass: "assertion failed: ...", "exited before the tests finished", ...

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _interpreter() -> tuple[str, list[str]]:
    """The Python to run inside, and the directory to bind for it."""
    base = Path(sys.base_prefix)
    if str(base).startswith("/usr"):
        return str(base / "bin" / "python3"), []
    if Path("/usr/bin/python3").exists():
        return "/usr/bin/python3", []
    exe = base / "bin" / "python3"
    return str(exe), [str(base)]


def _bwrap_args(files: Path, lim: Limits, uid: int | None, fd: int, entry: str, filter_fd: int) -> list[str]:
    """bubblewrap around the harness (bound read-only from kdkit itself); ``files`` holds program.py and
    test.py (bound read-only into /sandbox); ``filter_fd`` holds the process filter (:mod:`kdkit.evaluate.procfilter`)."""
    exe, binds = _interpreter()
    args = ["bwrap", "--seccomp", str(filter_fd), "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for link in ("bin", "lib", "lib64", "sbin"):
        p = Path("/") / link
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), f"/{link}"]
        elif p.is_dir():
            args += ["--ro-bind", str(p), f"/{link}"]
    for b in binds:
        args += ["--ro-bind", b, b]
    size = str(lim.disk_mb * 1024 * 1024)
    args += ["--proc", "/proc", "--dev", "/dev"]
    for d in ("/tmp", "/dev/shm", "/sandbox"):
        args += ["--size", size, "--perms", "1777", "--tmpfs", d]
    args += ["--perms", "0755", "--dir", "/kdkit", "--ro-bind", str(_HARNESS), "/kdkit/harness.py"]
    for name in ("program.py", "test.py"):
        if (files / name).exists():
            args += ["--ro-bind", str(files / name), f"/sandbox/{name}"]
    args += ["--chdir", "/sandbox", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/sandbox"]
    if uid is None:
        args += ["--unshare-user", "--"]
    else:
        args += ["--", "/usr/bin/setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--"]
    return args + [exe, *_PY_FLAGS, "/kdkit/harness.py", str(fd), entry]


_block_lock = threading.Lock()
_block: tuple[int, int] | None = None  # (first uid, fd of the held lock file)


def _lock_dir() -> Path:
    d = Path(tempfile.gettempdir()) / "kdkit-sandbox-uids"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def uid_base() -> int:
    """The first of this process's ``_BLOCK`` sandbox uids, claimed once by an exclusive lock file.

    The lock is released by the kernel when the process ends, however it ends."""
    global _block
    with _block_lock:
        if _block is not None:
            return _block[0]
        d = _lock_dir()
        for k in range(_N_BLOCKS):
            fd = os.open(d / f"block-{k:02d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _block = (_UID_BASE + k * _BLOCK, fd)
            return _block[0]
    raise SandboxUnavailable(f"all {_N_BLOCKS} blocks of sandbox uids are held by other kdkit processes")


def _uid_processes(uids: range) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            uid = int((p / "status").read_text().split("\nUid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
        if uid in uids:
            pids.append(int(p.name))
    return pids


def _reap(uid: int) -> None:
    """Kill every process running as ``uid`` and wait until none is left.

    bubblewrap can exit before the kernel has torn down the sandbox's PID namespace,
    so its exit alone does not mean the program's processes are gone."""
    deadline = time.monotonic() + _REAP_TIMEOUT_S
    while True:
        pids = _uid_processes(range(uid, uid + 1))
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if time.monotonic() > deadline:
            raise SandboxUnavailable(f"sandbox processes {pids} of uid {uid} survive SIGKILL; refusing to reuse it")
        time.sleep(0.005)


def _limit_fn(lim: Limits) -> Callable[[], None]:
    def apply() -> None:
        mem = lim.memory_mb * 1024 * 1024
        cpu = int(lim.timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.output_bytes, lim.output_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim.max_files, lim.max_files))
        resource.setrlimit(resource.RLIMIT_NPROC, (lim.max_procs, lim.max_procs))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


# The probe: Python runs, and the kernel refuses a new process (the process filter is in force).
_PROBE = ("import os\ntry:\n    pid = os.fork()\nexcept PermissionError:\n    print(6 * 7)\nelse:\n"
          "    if pid == 0:\n        os._exit(0)\n    print('forked')\n")
_probe_lock = threading.Lock()
_probe_ok: dict[str, bool] = {}


def check_isolation() -> None:
    """Raise :class:`SandboxUnavailable` unless a bubblewrap sandbox starts and runs Python here."""
    with _probe_lock:
        key = "bwrap"
        if _probe_ok.get(key):
            return
        if shutil.which("bwrap") is None:
            raise SandboxUnavailable(f"the sandbox needs bubblewrap (bwrap), which is not installed: {INSTALL_HINT}; "
                                     f"or pass --unsafe-no-isolation to run generated code WITHOUT isolation")
        if os.geteuid() == 0 and not Path("/usr/bin/setpriv").exists():
            raise SandboxUnavailable("running as root needs /usr/bin/setpriv (util-linux) to drop to an "
                                     "unprivileged uid inside the sandbox")
        res = _run_one(Program(_PROBE), Limits(timeout_s=20), slot=0, unsafe=False)
        if res.status == "passed" and res.stdout_tail.strip() == "forked":
            raise SandboxUnavailable("the sandbox starts but its process filter is not in force (a fork inside it "
                                     "succeeded): generated code is not run here; or pass --unsafe-no-isolation")
        if res.status != "passed" or res.stdout_tail.strip() != "42":
            raise SandboxUnavailable(f"bubblewrap is installed but the sandbox does not start here "
                                     f"({res.status}: {res.stderr_tail.strip()[-300:]}); {INSTALL_HINT}, and check "
                                     f"that user namespaces and seccomp are allowed; or pass --unsafe-no-isolation")
        _probe_ok[key] = True


def _tail(path: Path, n: int) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _read_verdict(fd: int, key: bytes) -> tuple[str, str] | None:
    """The harness's report on ``fd``: (status, reason), or None when there is none; a line that is not
    exactly one report keyed by ``key`` (the program wrote to the channel) is an error."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) <= 1 << 16:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    if not data:
        return None
    parts = data.split(b"\t")
    if len(parts) == 3 and data.endswith(b"\n") and data.count(b"\n") == 1:
        msg = parts[0] + b"\t" + parts[1]
        good = hashlib.blake2b(msg, key=key).hexdigest().encode()
        status = parts[0].decode("ascii", "replace")
        if hmac.compare_digest(good, parts[2].rstrip(b"\n")) and status in STATUSES:
            return status, parts[1].decode("utf-8", "replace")
    return "error", "the verdict channel holds something other than the harness's one report"


def _classify(verdict: tuple[str, str] | None, rc: int | None, timed_out: bool, stderr: str) -> tuple[str, str]:
    """(status, reason) from the harness's verdict; without one, the program ended before the harness
    could report, and never passes."""
    if verdict is not None:
        return verdict
    if timed_out or rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        return "timeout", "timeout"
    if "MemoryError" in stderr or rc in (-signal.SIGKILL, 128 + signal.SIGKILL) and "Killed" in stderr:
        return "oom", "out of memory"
    return "exited", f"exited before the tests finished (exit status {rc})"


def _stage(outer: Path, program: Program) -> None:
    """program.py and test.py, readable by the sandbox's uid (they are bound read-only into /sandbox)."""
    (outer / "program.py").write_text(program.source, encoding="utf-8")
    if program.test is not None:
        (outer / "test.py").write_text(program.test, encoding="utf-8")
    for f in outer.iterdir():
        f.chmod(0o644)


def _run_one(program: Program, lim: Limits, *, slot: int, unsafe: bool) -> RunResult:
    root_mode = os.geteuid() == 0 and not unsafe
    uid = uid_base() + slot if root_mode else None
    if uid is not None:
        _reap(uid)  # leftovers of a killed earlier holder of this block
    outer = Path(tempfile.mkdtemp(prefix="kdkit-sbx-"))  # 0700, ours: holds the files and captured output
    files = outer / "files"
    r_fd, w_fd = os.pipe()
    filter_fd = -1
    key = secrets.token_bytes(32)
    try:
        files.mkdir()
        _stage(files, program)
        out_p, err_p = outer / "stdout", outer / "stderr"
        entry = program.entry_point or ""
        if unsafe:
            work = outer / "work"  # no namespaces: the program runs beside its files, unbounded by tmpfs
            shutil.copytree(files, work)
            cmd = [sys.executable, *_PY_FLAGS, str(_HARNESS), str(w_fd), entry]
            env, cwd = {"PATH": "/usr/bin:/bin", "HOME": str(work)}, work
        else:
            filter_fd = _filter_fd()
            cmd, env, cwd = _bwrap_args(files, lim, uid, w_fd, entry, filter_fd), {"PATH": "/usr/bin:/bin"}, outer
        t0 = time.perf_counter()
        timed_out = False
        with out_p.open("wb") as out_f, err_p.open("wb") as err_f:
            try:
                proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out_f, stderr=err_f,
                                        preexec_fn=_limit_fn(lim), start_new_session=True, close_fds=True,
                                        pass_fds=(w_fd,) if filter_fd < 0 else (w_fd, filter_fd))
            except OSError as e:
                return RunResult("error", None, "", f"cannot start the sandbox: {e}", 0.0, "cannot start the sandbox")
            os.close(w_fd)
            w_fd = -1
            try:
                proc.stdin.write(key)
                proc.stdin.close()
            except OSError:
                pass  # it died before reading its key: no verdict can come
            try:
                rc = proc.wait(timeout=lim.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.wait()
        if uid is not None:
            _reap(uid)  # the result is returned only once the whole sandbox is gone
        dur = time.perf_counter() - t0
        stdout, stderr = _tail(out_p, lim.stderr_tail), _tail(err_p, lim.stderr_tail)
        status, reason = _classify(_read_verdict(r_fd, key), rc, timed_out, stderr)
        return RunResult(status, rc, stdout, stderr, dur, reason)
    finally:
        for fd in (r_fd, w_fd, filter_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(outer, ignore_errors=True)


def _filter_fd() -> int:
    """A descriptor from which bubblewrap reads the process filter (it fits a pipe's buffer: no writer waits)."""
    prog = procfilter.program()
    r, w = os.pipe()
    try:
        os.write(w, prog)
    finally:
        os.close(w)
    return r


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_programs(programs: Sequence[str | Program], *, limits: Limits = Limits(), workers: int | None = None,
                 unsafe_no_isolation: bool = False,
                 on_done: Callable[[int, RunResult], None] | None = None) -> list[RunResult]:
    """Run each program in its own sandbox, ``workers`` at a time; results in input order.

    A ``str`` is a plain program (passes when it runs to its end); a :class:`Program` carries a test."""
    programs = [p if isinstance(p, Program) else Program(p) for p in programs]
    if not unsafe_no_isolation:
        check_isolation()
    workers = max(1, min(workers or os.cpu_count() or 1, _BLOCK, len(programs) or 1))
    slots = list(range(workers))
    lock = threading.Lock()
    results: list[RunResult | None] = [None] * len(programs)

    def job(i: int) -> None:
        with lock:
            slot = slots.pop()
        try:
            results[i] = _run_one(programs[i], limits, slot=slot, unsafe=unsafe_no_isolation)
        finally:
            with lock:
                slots.append(slot)
        if on_done is not None:
            on_done(i, results[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(job, range(len(programs))))
    return [r for r in results if r is not None]


def leftover_processes() -> list[int]:
    """PIDs still running as one of this process's sandbox uids (a test checks that none survive)."""
    if os.geteuid() != 0:
        return []
    base = uid_base()
    return _uid_processes(range(base, base + _BLOCK))
