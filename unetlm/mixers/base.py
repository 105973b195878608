"""Mixer contract.

A mixer is one residual block ``(B, L, d) -> (B, L, d)``. Output position i may depend only
on input positions j <= i of the same document (``info.doc``); padding has its own document
id, so real positions never see it. ``memo`` is shared by all blocks of one stage call, so
a mask or rotary table is built once per stage, not once per layer: the stack calls every
block's ``prepare(info, memo)`` before the first block runs, outside activation
checkpointing and compiled regions, and ``forward`` only reads ``memo`` (a recomputed block
then runs the same graph as the original).

Step API (cached generation, one document per row): ``init_state`` makes an empty cache;
``step(x, state, memo)`` takes one new position per row and gives the output ``forward``
gives there. ``memo["step"]`` is a :class:`StepInfo`. Rows whose ``write`` is False are not
advancing: a mixer that updates its state in place must leave those rows untouched; one that
returns a new state object may ignore ``write`` (the caller keeps the old rows).
"""
from __future__ import annotations

from typing import ClassVar

import attrs
import torch
from torch import nn

from unetlm.core.layout import StageInfo
from unetlm.core.options import NoOptions


@attrs.frozen
class StepInfo:
    """The new position of every row at one generation step of a stage."""

    pos: torch.Tensor  # (B,) long: its index in the stage (0, 1, ...)
    write: torch.Tensor  # (B,) bool: rows that advance; the others' outputs are ignored
    length: int  # 1 + the largest pos of a writing row: cache slots beyond it are empty
    all_write: bool  # every row advances
    uniform: bool  # every row advances, all at the same pos: every cached key is visible


class Mixer(nn.Module):
    Config: ClassVar[type] = NoOptions
    examples: ClassVar[list[dict]] = [{}]

    def __init__(self, config, dim: int) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        self.compiled = False  # set when the block is compiled on its own (unetlm.train.parallelize)

    def prepare(self, info: StageInfo, memo: dict) -> None:
        """Add what ``forward`` reads from ``memo`` for this stage call (keys already there are kept)."""

    def forward(self, x: torch.Tensor, info: StageInfo, memo: dict) -> torch.Tensor:
        """Reads ``memo`` as filled by :meth:`prepare` (building what is missing); never writes it."""
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
