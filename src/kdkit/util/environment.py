"""The compute environment that produced a result's bytes: same inputs and same environment give the same
bytes; another CPU's kernels (or another GPU, torch or transformers) may round otherwise.

torch picks its CPU kernels by the instruction set it finds (``ATEN_CPU_CAPABILITY`` overrides it), and the
thread count changes the order of float reductions; both are recorded with the versions.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the machine's architecture where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compute_environment(device: str = "cpu") -> dict[str, Any]:
    """What rounds the numbers: the device (CPU kernels' instruction set and model, or the GPU's name), the
    thread count, the torch and transformers versions."""
    import transformers

    env: dict[str, Any] = {"device": torch.device(device).type, "machine": platform.machine(),
                           "torch": torch.__version__, "transformers": transformers.__version__}
    if env["device"] == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env.update(cpu=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   threads=torch.get_num_threads())
    return env


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: A vs B`` for each field where two environments differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} vs {y!r}")
    return out
