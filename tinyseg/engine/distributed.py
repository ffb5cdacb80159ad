"""torch.distributed set-up for torchrun: rank/world from the environment, gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device_kind: str, timeout_s: float = 600.0) -> None:
    """Join the process group torchrun describes; the timeout ends a job whose peer died."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_objects(value):
    """A list with every rank's value, in rank order (plain Python objects)."""
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def reduce_mean(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    if world_size() == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {k: v / world_size() for k, v in zip(keys, tensor.tolist())}
