"""Device and mixed-precision choices."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device or precision this machine does not have (a usage error: the CLI exits 2, no traceback)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise DeviceError(f"device '{name}' is not a device name (auto, cpu, cuda, cuda:N): {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name} asked for, but CUDA is not available here; use cpu or auto")
    return device


def cpu_has_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on CPUs with native bf16 (emulated bf16 is slower than fp32), fp16 on CUDA."""
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise DeviceError("amp fp16 needs CUDA; on a CPU use bf16 or none")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None
