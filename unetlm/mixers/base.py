"""Mixer contract.

A mixer is one residual block ``(B, L, d) -> (B, L, d)``. Output position i may depend only
on input positions j <= i of the same document (``info.doc``); padding has its own document
id and comes after a row's documents, so real positions never see it (its own outputs are
unspecified, finite). ``memo`` (``info.shared``) is shared by all blocks of a
stage and batch, so a mask or rotary table is built once per stage, not once per layer: the
stack calls every block's ``prepare(info, memo)`` before the first block runs, outside
activation checkpointing, and ``forward`` only reads ``memo`` (a recomputed block then runs the
same graph as the original).

Step protocol (cached generation, one document per row; see :mod:`unetlm.core.step`):
``init_state(batch, max_len, device, dtype)``; ``step(x (B, d), state, info: StepInfo) ->
(y (B, d), state)`` equal to ``forward`` at that position; ``prefill(x (B, L, d), state,
info: StageInfo) -> (y, state)``. The default ``prefill`` runs ``forward`` and then ``step``
over the positions; override it with one full-sequence pass.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from unetlm.core.layout import StageInfo
from unetlm.core.options import NoOptions
from unetlm.core.step import StepInfo, prefill_by_steps, stage_steps

__all__ = ["Mixer", "StepInfo"]


class Mixer(nn.Module):
    Config: ClassVar[type] = NoOptions
    examples: ClassVar[list[dict]] = [{}]

    def __init__(self, config, dim: int) -> None:
        super().__init__()
        self.config = config
        self.dim = dim

    def prepare(self, info: StageInfo, memo: dict) -> None:
        """Add what ``forward`` reads from ``memo`` for this stage call (keys already there are kept)."""

    def mask_bytes(self, rows: int, length: int) -> int:
        """Bytes of what :meth:`prepare` builds on CUDA for a stage of ``rows`` x ``length`` positions
        and keeps until the backward (the planner counts it once per stage)."""
        return 0

    def forward(self, x: torch.Tensor, info: StageInfo, memo: dict) -> torch.Tensor:
        """Reads ``memo`` as filled by :meth:`prepare` (building what is missing); never writes it."""
        raise NotImplementedError

    def init_state(self, batch: int, max_len: int, device, dtype):
        """Empty cache for step-by-step generation of up to ``max_len`` positions."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, state, info: StepInfo) -> tuple[torch.Tensor, object]:
        """One new position: x (B, d) -> (y (B, d), state). Equals ``forward`` at that position."""
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, state, info: StageInfo) -> tuple[torch.Tensor, object]:
        """x (B, L, d) from a fresh ``state`` -> (``forward``'s output, the state after each row's
        valid positions)."""
        y = self.forward(x, info, {})
        return y, prefill_by_steps(self.step, state, x.unbind(1), stage_steps(info))

    def forward_flops(self, length: int) -> float:
        """Forward FLOPs of this block over one sequence of ``length`` positions."""
        raise NotImplementedError
