"""The process filter, run through a plain classic-BPF interpreter: what each system call gets."""

from __future__ import annotations

import errno
import struct

import pytest

from kdkit.evaluate import procfilter
from kdkit.evaluate.procfilter import CLONE_THREAD, ProcessFilterUnavailable

ALLOW, KILL = 0x7FFF0000, 0x80000000
EPERM, ENOSYS = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# (name, x86_64 number, aarch64 number); None: the call does not exist there
CALLS = {"read": (0, 63), "write": (1, 64), "execve": (59, 221), "clone": (56, 220), "clone3": (435, 435),
         "fork": (57, None), "vfork": (58, None), "ptrace": (101, 117), "process_vm_readv": (310, 270),
         "process_vm_writev": (311, 271), "pidfd_getfd": (438, 438), "mmap": (9, 222), "futex": (202, 98)}


def run_bpf(prog: bytes, nr: int, arch: int, arg0: int = 0) -> int:
    """Classic BPF, the four instructions the filter uses, over struct seccomp_data."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    ops = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = ops[pc]
        if code == 0x20:  # ld word at absolute offset k
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x45, 0x35):  # jeq, jset, jge
            hit = acc == k if code == 0x15 else (acc & k) != 0 if code == 0x45 else acc >= k
            pc += 1 + (jt if hit else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_each_call_gets_what_the_threat_model_says(machine):
    prog, col = procfilter.program(machine), 0 if machine == "x86_64" else 1
    want = {"fork": EPERM, "vfork": EPERM, "ptrace": EPERM, "process_vm_readv": EPERM, "process_vm_writev": EPERM,
            "pidfd_getfd": EPERM, "clone3": ENOSYS}
    for name, nrs in CALLS.items():
        if nrs[col] is None:
            continue
        got = run_bpf(prog, nrs[col], ARCH[machine])
        assert got == want.get(name, EPERM if name == "clone" else ALLOW), (machine, name, hex(got))
    clone = CALLS["clone"][col]
    thread_flags = 0x3D0F00  # what glibc's pthread_create passes: CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|...
    assert thread_flags & CLONE_THREAD
    assert run_bpf(prog, clone, ARCH[machine], thread_flags) == ALLOW
    assert run_bpf(prog, clone, ARCH[machine], 0x4111) == EPERM  # CLONE_VM|CLONE_VFORK|SIGCHLD: posix_spawn
    assert run_bpf(prog, clone, ARCH[machine], 0x01200011) == EPERM  # fork() through clone
    other = ARCH["aarch64" if machine == "x86_64" else "x86_64"]
    assert run_bpf(prog, CALLS["read"][col], other) == KILL  # a foreign architecture's table is never consulted


def test_the_x32_table_is_refused_on_x86_64():
    prog = procfilter.program("x86_64")
    assert run_bpf(prog, 0x40000000 | 57, ARCH["x86_64"]) == EPERM
    assert run_bpf(prog, 0x40000000 | 0, ARCH["x86_64"]) == EPERM


def test_an_unknown_architecture_is_refused_before_anything_runs():
    with pytest.raises(ProcessFilterUnavailable, match="riscv64"):
        procfilter.program("riscv64")
