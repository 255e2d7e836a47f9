"""What benchmarks print about the machine: the CPU model, its ISA flags (lscpu) and the load average.

int8 speed-ups depend on VNNI/AMX and on what else runs, so every timing states both.

    >>> cpu = cpu_info()
    >>> isinstance(cpu.model, str) and isinstance(cpu.flags, frozenset)
    True
"""
from __future__ import annotations

import functools
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


# x86 ISA extensions whose int8 dot product accumulates u8×s8 products straight into int32
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_dot_saturates(cpu: CpuInfo | None = None, machine: str | None = None) -> bool:
    """Whether this CPU's int8 kernels add u8×s8 product pairs in int16 with saturation.

    x86 without VNNI/AMX: onnxruntime, OpenVINO and fbgemm use vpmaddubsw there (SSE/AVX2/AVX-512),
    which saturates (see `qdet.config.OverflowFix`). False off x86 (ARM's dot products accumulate in
    int32) and when lscpu cannot say (no flags: nothing to base a change of the weights on).

    >>> int8_dot_saturates(CpuInfo("AMD EPYC", frozenset({"avx2", "fma"})), machine="x86_64")
    True
    >>> int8_dot_saturates(CpuInfo("Intel Xeon", frozenset({"avx2", "avx512_vnni"})), machine="x86_64")
    False
    """
    cpu = cpu or _this_cpu()
    x86 = (machine or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and cpu.available and bool(cpu.flags) and not (cpu.flags & VNNI_FLAGS)


@functools.lru_cache(maxsize=1)
def _this_cpu() -> CpuInfo:
    return cpu_info()


# the ISA extensions that decide int8 vs fp32 speed (and int8 correctness, see int8_dot_saturates)
INT8_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def isa_summary(cpu: CpuInfo | None = None, machine: str | None = None) -> str:
    """The int8-relevant ISA flags this CPU has, e.g. "avx2 fma (no VNNI: int8 pairs saturate)".

    >>> isa_summary(CpuInfo("AMD EPYC", frozenset({"avx2", "fma", "sse4_2"})), machine="x86_64")
    'avx2 fma (no VNNI: int8 pairs saturate)'
    """
    cpu = cpu or _this_cpu()
    if not cpu.available:
        return "lscpu unavailable"
    present = " ".join(f for f in INT8_ISA_FLAGS if f in cpu.flags) or "none of avx2/avx512/vnni/amx"
    return present + (" (no VNNI: int8 pairs saturate)" if int8_dot_saturates(cpu, machine) else "")


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. "1.10 0.93 2.47"."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
