"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from unetlm.recipe.schema import TrainingSpec


def make_optimizer(model: nn.Module, spec: TrainingSpec) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(spec.beta1, spec.beta2))


def lr_factor(step: int, spec: TrainingSpec) -> float:
    """Linear warmup over ``warmup_fraction`` of the steps, then cosine to ``min_lr_fraction``."""
    warmup = max(1, int(spec.warmup_fraction * spec.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, spec.steps - warmup))
    return spec.min_lr_fraction + (1 - spec.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, spec: TrainingSpec) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec))
