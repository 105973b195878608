"""``lr = "auto"`` and ``batch_size = "auto"``: hyperparameters from the compute budget.

The AU-Net paper's fits: BSZ = 0.66 * C^0.321 and LR = 6.6 * C^-0.176, with C the training
compute in FLOPs and BSZ the global batch in bytes per optimizer step (see docs/training.md).
C = (training FLOPs per byte, counted exactly from the model's static shapes) x (bytes trained),
and bytes trained = steps x BSZ. With the steps fixed and the batch "auto" both are unknown;
substituting gives the closed form BSZ = (0.66 * (F * steps)^0.321)^(1 / (1 - 0.321)).

The global batch is a hyperparameter of the run, never of the cluster: "auto" depends on the
compute budget alone (rounded to whole sequences: a power of two below 64, a multiple of 64
above, so that it splits over the usual GPU counts), and :func:`split_batch` checks that
processes x micro-batch x accumulation make it up exactly.
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


AUTO_BATCH_GRANULE = 64  # sequences: an automatic batch above this is a multiple of it


def round_batch(sequences: float) -> int:
    """An automatic global batch from the fit's ``sequences``: the nearest power of two up to
    ``AUTO_BATCH_GRANULE``, the nearest multiple of it above (independent of the process count)."""
    if sequences >= AUTO_BATCH_GRANULE:
        return AUTO_BATCH_GRANULE * round(sequences / AUTO_BATCH_GRANULE)
    powers = [2**k for k in range(AUTO_BATCH_GRANULE.bit_length())]
    return min(powers, key=lambda p: abs(p - sequences))


def resolve_budget(
    batch_size, lr, steps: int, seq_len: int, flops_per_byte: float, bytes_per_token: float = 1.0
) -> Budget:
    """Resolve "auto" values from the compute budget alone (never from the process count).

    A sequence holds ``seq_len`` positions of ``bytes_per_token`` bytes each (1 for byte models)."""
    seq_bytes = seq_len * bytes_per_token
    batch_auto = batch_size == "auto"
    if batch_auto:
        exact = (BSZ_COEF * (flops_per_byte * steps) ** BSZ_EXP) ** (1.0 / (1.0 - BSZ_EXP))
        batch_size = round_batch(exact / seq_bytes)
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


@attrs.frozen
class BatchSplit:
    """How a step's global batch is made: processes x micro-batches x rows per micro-batch."""

    global_batch: int
    processes: int
    micro_batch: int  # rows per forward on each process
    accumulation: int  # micro-batches per step on each process

    @property
    def local_rows(self) -> int:
        return self.micro_batch * self.accumulation


def split_batch(global_batch: int, processes: int, micro_batch: int = 0) -> BatchSplit:
    """``global_batch`` = ``processes`` x ``accumulation`` x ``micro_batch`` exactly (``micro_batch`` 0:
    each process's rows in one pass), or a ValueError saying which numbers would."""
    if global_batch % processes:
        below = global_batch - global_batch % processes
        options = " or ".join(str(b) for b in (below, below + processes) if b > 0)
        counts = ", ".join(str(n) for n in range(1, global_batch + 1) if global_batch % n == 0)
        raise ValueError(
            f"training.batch_size = {global_batch} does not split over {processes} processes (each takes whole "
            f"sequences); the global batch never depends on the process count, so run on a process count that "
            f"divides {global_batch} ({counts}) or set training.batch_size to a multiple of {processes} (e.g. {options})"
        )
    local = global_batch // processes
    micro = micro_batch or local
    if local % micro:
        raise ValueError(
            f"training.micro_batch_size = {micro_batch} does not divide the {local} sequences each of the "
            f"{processes} processes takes from training.batch_size = {global_batch}"
        )
    return BatchSplit(global_batch, processes, micro, local // micro)


def check_resumed_batch(stored: int | None, global_batch: int) -> None:
    """A resumed run keeps its global batch (it sets the lr schedule's meaning and the data order)."""
    if stored is not None and stored != global_batch:
        raise ValueError(
            f"the checkpoint was trained with a global batch of {stored} sequences, this run would use "
            f"{global_batch}; set training.batch_size = {stored} to resume it"
        )
