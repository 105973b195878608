"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from unetlm.recipe.schema import TrainingSpec


def lr_multipliers(model: nn.Module) -> list[tuple[float, list[nn.Parameter]]]:
    """(multiplier, parameters) per stage (``StageSpec.lr_multiplier``); one group for other models."""
    stages = getattr(model, "parameter_stages", None)
    if stages is None:
        return [(1.0, list(model.parameters()))]
    specs = model.spec.stages
    return [(spec.lr_multiplier or 1.0, params) for spec, params in zip(specs, stages())]


def make_optimizer(model: nn.Module, spec: TrainingSpec, lr: float) -> torch.optim.AdamW:
    """AdamW at ``lr`` (the resolved learning rate: ``spec.lr`` may be "auto") times each stage's
    multiplier; groups record their ``lr_multiplier``."""
    by_multiplier: dict[float, tuple[list, list]] = {}
    for mult, params in lr_multipliers(model):
        decay, no_decay = by_multiplier.setdefault(mult, ([], []))
        for p in params:
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = []
    for mult, (decay, no_decay) in by_multiplier.items():
        groups += [
            {"params": decay, "weight_decay": spec.weight_decay, "lr": lr * mult, "lr_multiplier": mult},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr * mult, "lr_multiplier": mult},
        ]
    # fused: one kernel per device, and its found_inf flag lets a non-finite step be skipped on the
    # device (unetlm/train/guard.py)
    return torch.optim.AdamW(groups, lr=lr, betas=(spec.beta1, spec.beta2), fused=True)


def lr_factor(step: int, spec: TrainingSpec) -> float:
    """Linear warmup over ``warmup_fraction`` of the steps, then cosine to ``min_lr_fraction``."""
    warmup = max(1, int(spec.warmup_fraction * spec.steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, spec.steps - warmup))
    return spec.min_lr_fraction + (1 - spec.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, spec: TrainingSpec) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec))
