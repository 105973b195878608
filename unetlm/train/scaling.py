"""``lr = "auto"`` and ``batch_size = "auto"``: hyperparameters from the compute budget.

The AU-Net paper's fits: BSZ = 0.66 * C^0.321 and LR = 6.6 * C^-0.176, with C the training
compute in FLOPs and BSZ the global batch in bytes per optimizer step (see docs/training.md).
C = (training FLOPs per byte, counted exactly from the model's static shapes) x (bytes trained),
and bytes trained = steps x BSZ. With the steps fixed and the batch "auto" both are unknown;
substituting gives the closed form BSZ = (0.66 * (F * steps)^0.321)^(1 / (1 - 0.321)).
"""
from __future__ import annotations

import math

import attrs

BSZ_COEF, BSZ_EXP = 0.66, 0.321
LR_COEF, LR_EXP = 6.6, -0.176


def fitted_batch_bytes(compute: float) -> float:
    return BSZ_COEF * compute**BSZ_EXP


def fitted_lr(compute: float) -> float:
    return LR_COEF * compute**LR_EXP


@attrs.frozen
class Budget:
    batch_size: int  # global, in sequences
    lr: float
    compute: float  # FLOPs for the whole run
    bytes: int  # bytes trained in the whole run
    flops_per_byte: float
    batch_auto: bool
    lr_auto: bool
    seq_len: int  # positions per sequence
    bytes_per_token: float  # 1 for byte models

    def describe(self) -> str:
        if self.bytes_per_token == 1.0:
            batch = f"batch {self.batch_size} x {self.seq_len} bytes"
        else:
            batch = f"batch {self.batch_size} x {self.seq_len} tokens ({self.bytes_per_token:.2f} bytes per token)"
        if self.batch_auto:
            batch += f" (auto: 0.66*C^0.321 = {fitted_batch_bytes(self.compute):,.0f} bytes, rounded)"
        lr = f"lr {self.lr:.3g}" + (" (auto: 6.6*C^-0.176)" if self.lr_auto else "")
        return (
            f"budget C = {self.flops_per_byte:,.0f} FLOPs/byte x {self.bytes:,} bytes = {self.compute:.3e} FLOPs; "
            f"{batch}; {lr}"
        )


def resolve_budget(
    batch_size, lr, steps: int, seq_len: int, flops_per_byte: float, world: int = 1, bytes_per_token: float = 1.0
) -> Budget:
    """Resolve "auto" values; an automatic batch is a multiple of ``world`` sequences (at least one each).

    A sequence holds ``seq_len`` positions of ``bytes_per_token`` bytes each (1 for byte models)."""
    seq_bytes = seq_len * bytes_per_token
    batch_auto = batch_size == "auto"
    if batch_auto:
        exact = (BSZ_COEF * (flops_per_byte * steps) ** BSZ_EXP) ** (1.0 / (1.0 - BSZ_EXP))
        batch_size = max(world, world * round(exact / seq_bytes / world))
    total = round(steps * batch_size * seq_bytes)
    compute = flops_per_byte * total
    lr_auto = lr == "auto"
    if lr_auto:
        lr = fitted_lr(compute)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"learning rate {lr} from the budget is not usable")
    return Budget(
        int(batch_size), float(lr), compute, total, flops_per_byte, batch_auto, lr_auto, seq_len, bytes_per_token
    )
