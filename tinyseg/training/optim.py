"""Optimizer and a per-iteration learning-rate schedule: linear warm-up, then cosine, steps or constant."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import SolverConfig


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        # Norm scales and biases are not weights to shrink (standard practice since Goyal et al., 2017).
        (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return _fused_if_possible(torch.optim.AdamW, groups, lr=cfg.lr)
    return _fused_if_possible(torch.optim.SGD, groups, lr=cfg.lr, momentum=cfg.momentum)


def _fused_if_possible(optimizer: type[torch.optim.Optimizer], groups: list[dict], **options) -> torch.optim.Optimizer:
    """The optimizer's fused kernel (one pass over every tensor, instead of several small ops per tensor;
    on a CPU since torch 2.4), else its default. The same update; its share of a CPU training step:
    benchmarks/README.md."""
    try:
        return optimizer(groups, fused=True, **options)
    except (RuntimeError, TypeError):  # a torch or device without a fused kernel for it
        return optimizer(groups, **options)


def lr_factor(cfg: SolverConfig, iteration: int, total_iters: int, iters_per_epoch: int,
              time_progress: float = 0.0) -> float:
    """time_progress: the share of a wall-clock budget used; a cosine ends at whichever limit comes first."""
    warmup = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / max(1, cfg.warmup_iters)
        warmup = cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.scheduler == "cosine":
        progress = min(1.0, max(iteration / max(1, total_iters), time_progress))
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.scheduler == "step":
        epoch = iteration // max(1, iters_per_epoch)
        return warmup * cfg.gamma ** sum(epoch >= s for s in cfg.step_epochs)
    return warmup


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig, total_iters: int,
                    iters_per_epoch: int, time_progress=lambda: 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(cfg, it, total_iters, iters_per_epoch, time_progress()))


class ModelEma:
    """Exponential moving average of the weights (buffers copied), with the usual warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / 2000))
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.state[key].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                self.state[key].copy_(value)
