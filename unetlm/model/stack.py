"""A stack of mixer blocks run at one stage; with ``checkpointing`` each block is recomputed in backward."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from unetlm.core.layout import StageInfo
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

    def forward_flops(self, length: int) -> float:
        return sum(block.forward_flops(length) for block in self.blocks)
