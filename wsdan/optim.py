"""Optimiser and learning-rate schedule of the training recipe (docs/algorithm.md §5).

SGD with momentum; the new layers (attention conv, classifier) get ``head_lr_mult`` times
the backbone's rate; StepLR (×γ every ``lr_step_epochs``) after an optional linear warm-up;
the base rate scales linearly with the global batch when ``lr_scaling == "linear"``.
The schedule is a pure function of the (fractional) epoch, so a resumed job lands on
exactly the rate it left.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from wsdan.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """Base learning rate for a global batch (linear scaling rule, Goyal et al. 2017)."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch_size / cfg.base_batch_size
    return cfg.lr


def lr_factor(cfg: OptimConfig, epoch: float) -> float:
    """Multiplier of the base rate at a fractional epoch (0 = start of training)."""
    decay = cfg.lr_gamma ** math.floor(epoch / cfg.lr_step_epochs)
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return decay * (epoch + 1e-8) / cfg.warmup_epochs
    return decay


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, base_lr: float
) -> torch.optim.SGD:
    """SGD with two parameter groups: backbone (lr) and new layers (lr × head_lr_mult).

    Works for a :class:`wsdan.model.WSDAN` and for any module exposing
    ``new_parameters()``; everything else counts as backbone.
    """
    new = list(model.new_parameters()) if hasattr(model, "new_parameters") else []
    new_ids = {id(p) for p in new}
    backbone = [p for p in model.parameters() if id(p) not in new_ids]
    groups = [
        {"params": backbone, "lr": base_lr, "lr_mult": 1.0, "name": "backbone"},
        {"params": new, "lr": base_lr * cfg.head_lr_mult, "lr_mult": cfg.head_lr_mult,
         "name": "head"},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(
        groups, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Set every group's rate to base_lr × factor × its multiplier; returns base_lr × factor."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * factor * g.get("lr_mult", 1.0)
    return base_lr * factor
