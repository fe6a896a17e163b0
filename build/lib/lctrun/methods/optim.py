"""Optimisers and learning-rate schedules shared by every method.

Schedules advance every optimiser step (milestones are given in epochs), so that a short run still
anneals: stepping once per epoch would leave a 2-epoch cosine run at half its learning rate.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

from lctrun.config import OptimConfig


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def lr_factor(cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    if cfg.schedule == "multistep":
        epoch = step / max(steps_per_epoch, 1)
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    return 1.0


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, epochs: int, steps_per_epoch: int):
    total = epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_factor, cfg, total, steps_per_epoch))


def _factor(cfg: OptimConfig, total: int, steps_per_epoch: int, step: int) -> float:
    return lr_factor(cfg, step, total, steps_per_epoch)
