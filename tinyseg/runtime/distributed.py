"""torch.distributed set-up for torchrun: rank/world from the environment, gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import datetime
import logging
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


def init(device: torch.device, timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes and return this rank's device.

    NCCL on CUDA (one GPU per local rank), gloo on CPU. The timeout ends a job whose peer died instead
    of letting it hang; only rank 0 logs at INFO level.
    """
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if not is_main():
        logging.getLogger("tinyseg").setLevel(logging.WARNING)
    return device


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
