"""Non-finite losses stop a run before they reach the weights, without a host sync per step.

Each step's loss and gradient norm (both the same on every rank) are tested on the device; from
the first non-finite step on, the fused AdamW skips every update (its ``found_inf`` flag, on the
device), so neither weights nor optimizer state change. :meth:`FiniteGuard.check`, called where
the host syncs anyway (log steps, before a checkpoint is written), stops the run naming that step:
no checkpoint is ever written after it, and the last good one stays.
"""
from __future__ import annotations

from pathlib import Path

import torch

from unetlm.core.errors import RunError


class FiniteGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, checkpoint: Path) -> None:
        self.found = torch.zeros((), dtype=torch.float32, device=device)  # 1.0 from the first bad step on
        self.first = torch.zeros(3, dtype=torch.float64, device=device)  # (step, loss, gradient norm) of it
        self.checkpoint = checkpoint
        optimizer.found_inf = self.found  # the fused AdamW step is skipped while it is 1

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Record step ``step`` before its optimizer update (device work only)."""
        at = torch.full((1,), float(step), dtype=torch.float64, device=self.found.device)  # a fill, not a copy
        values = torch.cat([at, loss.detach().double().view(1), grad_norm.detach().double().view(1)])
        bad = ~torch.isfinite(values).all()
        first = bad & (self.found == 0)
        self.first.copy_(torch.where(first, values, self.first))
        self.found.copy_(torch.maximum(self.found, bad.float()))

    def check(self) -> None:
        """Raise if a step since the start was not finite (a host sync)."""
        if self.found.item():
            step, loss, norm = self.first.tolist()
            what = f"loss became {loss}" if not torch.isfinite(torch.tensor(loss)) else f"gradient norm became {norm}"
            raise RunError(
                f"{what} at step {int(step)}; stopping (no update was applied from that step on). The last good "
                f"checkpoint ({self.checkpoint}) is kept; lower training.lr or training.grad_clip and run again."
            )
