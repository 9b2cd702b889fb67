"""CPU threads per process, chosen before torch starts its OpenMP pool (``import kdkit`` does this).

torch's default is one thread per core, each spinning while it waits for work. On a machine that other
work shares — a second kdkit process, a test suite, torchrun's ranks — the spinning threads take turns
with the processes they wait for, and a run slows down by more than its share of the cores. kdkit
therefore, unless told otherwise:

* lets waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``) when other work is running as the process starts
  (another runnable task in /proc/loadavg, in each of three looks); on an idle machine the threads keep
  spinning, which is faster there. The wait policy never changes a result, only the time;
* gives each process the cores it may run on (its CPU affinity, e.g. a container's cpuset) divided among
  the processes of this machine's launch (``LOCAL_WORLD_SIZE``, as torchrun sets it), at least one
  (``OMP_NUM_THREADS``).

``KDKIT_THREADS=N`` sets N threads; ``KDKIT_THREADS=torch`` leaves OpenMP's and torch's defaults alone. An
``OMP_NUM_THREADS`` or ``OMP_WAIT_POLICY`` already in the environment is kept. The thread count changes
float reductions, so runs compare bitwise at the same count (it is recorded in run.json).
"""

from __future__ import annotations

import os

ENV = "KDKIT_THREADS"


def cores_available() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_threads(environ: dict[str, str] | os._Environ[str]) -> int:
    """The process's share of its cores: affinity ÷ local processes, at least 1."""
    local = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores_available() // max(local, 1))


def busy(samples: int = 3) -> bool:
    """Other work is running now: /proc/loadavg counts more runnable tasks than this one in every look (a
    CPU-bound job always is; a passing kernel thread is not). Without /proc, the 1-minute load average."""
    import time

    try:
        seen = []
        for _ in range(samples):
            with open("/proc/loadavg") as fh:
                seen.append(int(fh.read().split()[3].split("/")[0]) - 1)  # minus the reader itself
            time.sleep(0.001)
        return min(seen) >= 1
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0] >= 0.5
        except OSError:
            return True


def configure(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """Set the OpenMP environment as the module docstring says (before torch is imported, to take effect)."""
    choice = environ.get(ENV, "auto").strip().lower()
    if choice == "torch":
        return
    if busy():
        environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if choice == "auto":
        environ.setdefault("OMP_NUM_THREADS", str(default_threads(environ)))
        return
    if not choice.isdigit() or int(choice) < 1:
        raise SystemExit(f"{ENV}={environ[ENV]!r}: expected a number of threads >= 1, 'auto' or 'torch'")
    environ["OMP_NUM_THREADS"] = choice
