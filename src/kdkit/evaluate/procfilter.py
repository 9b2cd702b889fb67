"""The sandbox's process filter: a seccomp program (classic BPF) under which no new process can start.

Why: the harness's audit hook guards one process. A process the candidate starts (through
``subprocess``, ``os.posix_spawn``, a shell tool, any route at all) has no hook, and under the same
uid it could read or write the harness's memory through ``/proc/PID/mem`` — take the verdict's key,
or rewrite what a status means. The kernel refuses, for every process of the sandbox:

* ``fork``, ``vfork``, and ``clone`` without ``CLONE_THREAD`` (a new process): ``EPERM``;
  ``clone`` with ``CLONE_THREAD`` (a thread of the same process, under the same hook) is allowed;
* ``clone3``, whose flags the filter cannot read (they live in user memory): ``ENOSYS``, on
  which the C library falls back to ``clone`` for threads;
* ``ptrace``, ``process_vm_readv``/``writev`` and ``pidfd_getfd`` (another process's memory or
  descriptors): ``EPERM``;
* on x86-64, any system call of the x32 ABI (numbers with bit 30 set, a second table of calls);
  a foreign architecture's calls end the process.

``execve`` stays allowed: bubblewrap loads the filter before it starts the interpreter, and an
``execve`` from the candidate replaces the harness's process (and its key) without making another.
"""

from __future__ import annotations

import errno
import platform
import struct

from kdkit.util.errors import KdkitError

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JSET_K, _JGE_K, _RET_K = 0x20, 0x15, 0x45, 0x35, 0x06
_ALLOW, _ERRNO, _KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # offsets into struct seccomp_data (little-endian: the low word first)
CLONE_THREAD = 0x00010000
_X32_BIT = 0x40000000

# machine -> (AUDIT_ARCH_*, clone, clone3, {name: number} refused with EPERM)
_TABLES = {
    "x86_64": (0xC000003E, 56, 435, {"fork": 57, "vfork": 58, "ptrace": 101, "process_vm_readv": 310,
                                     "process_vm_writev": 311, "pidfd_getfd": 438}),
    "aarch64": (0xC00000B7, 220, 435, {"ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
                                       "pidfd_getfd": 438}),
}


class ProcessFilterUnavailable(KdkitError, RuntimeError):
    """No process filter is known for this machine's architecture; nothing was run."""


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def program(machine: str | None = None) -> bytes:
    """The filter as bytes of ``struct sock_filter`` (what bubblewrap's ``--seccomp FD`` reads)."""
    machine = machine or platform.machine()
    if machine not in _TABLES:
        raise ProcessFilterUnavailable(
            f"the sandbox's process filter knows x86_64 and aarch64, not {machine!r}: generated code is not run "
            f"here (pass --unsafe-no-isolation to run it WITHOUT isolation)")
    arch, clone, clone3, refused = _TABLES[machine]
    eperm, enosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    ops = [_op(_LD_W_ABS, _ARCH), _op(_JEQ_K, arch, 1, 0), _op(_RET_K, _KILL_PROCESS), _op(_LD_W_ABS, _NR)]
    if machine == "x86_64":
        ops += [_op(_JGE_K, _X32_BIT, 0, 1), _op(_RET_K, eperm)]
    for nr in refused.values():
        ops += [_op(_JEQ_K, nr, 0, 1), _op(_RET_K, eperm)]
    ops += [_op(_JEQ_K, clone3, 0, 1), _op(_RET_K, enosys)]
    # clone: a thread (CLONE_THREAD set) is allowed, anything else is a new process
    ops += [_op(_JEQ_K, clone, 0, 4), _op(_LD_W_ABS, _ARG0_LOW), _op(_JSET_K, CLONE_THREAD, 1, 0),
            _op(_RET_K, eperm), _op(_RET_K, _ALLOW)]
    ops += [_op(_RET_K, _ALLOW)]
    return b"".join(ops)
