"""What benchmarks print about the machine: the CPU model, its ISA flags (lscpu) and the load average.

int8 speed-ups depend on VNNI/AMX and on what else runs, so every timing states both.

    >>> cpu = cpu_info()
    >>> isinstance(cpu.model, str) and isinstance(cpu.flags, frozenset)
    True
"""
from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuInfo:
    model: str  # lscpu's "Model name" ("?" when lscpu is unavailable)
    flags: frozenset[str]  # every flag lscpu reports (empty when unavailable)
    available: bool = True


def cpu_info() -> CpuInfo:
    """The CPU as lscpu describes it."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return CpuInfo(platform.processor() or "?", frozenset(), available=False)
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return CpuInfo(fields.get("Model name", "?").strip(), frozenset(fields.get("Flags", "").split()))


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. "1.10 0.93 2.47"."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
