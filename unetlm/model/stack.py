"""A stack of mixer blocks run at one stage; with ``checkpointing`` each block is recomputed in backward.

The stack follows the blocks' step protocol (:mod:`unetlm.core.step`) with a list of their states.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from unetlm.core.layout import StageInfo
from unetlm.core.step import StepInfo
from unetlm.recipe.schema import Component


class Stack(nn.Module):
    def __init__(self, mixer: Component, dim: int, layers: int) -> None:
        super().__init__()
        cls = mixer.build_class()
        self.blocks = nn.ModuleList(cls(mixer.config, dim) for _ in range(layers))
        self.checkpointing = False

    def forward(self, h: torch.Tensor, info: StageInfo) -> torch.Tensor:
        memo: dict = {}
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, info, memo, use_reentrant=False)
            else:
                h = block(h, info, memo)
        return h

    def init_state(self, batch: int, max_len: int, device, dtype) -> list:
        return [block.init_state(batch, max_len, device, dtype) for block in self.blocks]

    def step(self, h: torch.Tensor, states: list, info: StepInfo) -> tuple[torch.Tensor, list]:
        new = []
        for block, state in zip(self.blocks, states):
            h, state = block.step(h, state, info)
            new.append(state)
        return h, new

    def prefill(self, h: torch.Tensor, states: list, info: StageInfo) -> tuple[torch.Tensor, list]:
        new = []
        for block, state in zip(self.blocks, states):
            h, state = block.prefill(h, state, info)
            new.append(state)
        return h, new

    def forward_flops(self, length: int) -> float:
        return sum(block.forward_flops(length) for block in self.blocks)
