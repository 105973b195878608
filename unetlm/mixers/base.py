"""Mixer contract.

A mixer is one residual block ``(B, L, d) -> (B, L, d)``. Output position i may depend only
on input positions j <= i of the same document (``info.doc``); padding has its own document
id, so real positions never see it. ``memo`` is shared by all blocks of one stage call, so
a mask or rotary table is built once per stage, not once per layer.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from unetlm.model.layout import StageInfo
from unetlm.splitters.base import NoOptions


class Mixer(nn.Module):
    Config: ClassVar[type] = NoOptions
    examples: ClassVar[list[dict]] = [{}]

    def __init__(self, config, dim: int) -> None:
        super().__init__()
        self.config = config
        self.dim = dim

    def forward(self, x: torch.Tensor, info: StageInfo, memo: dict) -> torch.Tensor:
        raise NotImplementedError

    def init_state(self, batch: int, max_len: int, device, dtype):
        """Empty cache for step-by-step generation of up to ``max_len`` positions."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, state, memo: dict) -> tuple[torch.Tensor, object]:
        """One new position: x (B, d) -> (y (B, d), state). Equals ``forward`` at that position."""
        raise NotImplementedError

    def forward_flops(self, length: int) -> float:
        """Forward FLOPs of this block over one sequence of ``length`` positions."""
        raise NotImplementedError
