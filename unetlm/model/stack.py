"""A stack of mixer blocks run at one stage."""
from __future__ import annotations

import torch
from torch import nn

from unetlm.model.layout import StageInfo
from unetlm.recipe.schema import Component


class Stack(nn.Module):
    def __init__(self, mixer: Component, dim: int, layers: int) -> None:
        super().__init__()
        cls = mixer.build_class()
        self.blocks = nn.ModuleList(cls(mixer.config, dim) for _ in range(layers))

    def forward(self, h: torch.Tensor, info: StageInfo) -> torch.Tensor:
        memo: dict = {}
        for block in self.blocks:
            h = block(h, info, memo)
        return h

    def forward_flops(self, length: int) -> float:
        return sum(block.forward_flops(length) for block in self.blocks)
