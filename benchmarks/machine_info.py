"""What every benchmark result records about where it ran, and the one writer of result files.

A speed or accuracy number means little without the CPU that produced it: this project's numbers came
from an Intel Xeon with AVX512-BF16/AMX and from an AVX2-only AMD EPYC, 2.3x apart per training step.
So write_result stamps each result file with the CPU's name and the instruction-set flags that decide
which kernels (and whether native bf16) torch can use.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The flags that change which kernels run: vector width (avx2, avx512f), native bf16/fp16 arithmetic
# (avx512_bf16, avx512_fp16, amx_bf16), int8 dot products (vnni, amx_int8) and AMX tiles.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                "amx_tile", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """(model name, the KERNEL_FLAGS it has) from /proc/cpuinfo text (read when not given)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    name, flags = platform.processor() or "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break  # every core lists the same flags; the model name comes before them
    return name, [flag for flag in KERNEL_FLAGS if flag in flags]


def machine_info() -> dict:
    """The machine fields of every result file."""
    import torch

    name, flags = cpu_info()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {"cpu_name": name, "cpu_flags": flags, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu_name": gpu}


def machine() -> str:
    info = machine_info()
    return f"{info['cpu_name']} ({', '.join(info['cpu_flags']) or 'no AVX2'}), {info['cpu_count']} cores, torch {info['torch']}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_result(path: str | None, result: dict) -> None:
    """Write a benchmark result as JSON (atomically), when a path is given, with the machine fields added
    (a field the result already has wins)."""
    if path:
        from tinyseg.runtime.files import atomic_write_text

        fields = {"machine": machine(), **machine_info(), "commit": commit()}
        atomic_write_text(path, json.dumps({**fields, **result}, indent=2))
