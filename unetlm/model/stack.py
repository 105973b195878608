"""A stack of mixer blocks run at one stage.

What the blocks share (masks, rotary tables) is built once per stage and batch, before the
first block, by each block's ``prepare``, into ``info.shared`` (so the encoder and the decoder of a
stage share it); the blocks only read it. A block wrapped for activation checkpointing or
compiled (:mod:`unetlm.train.parallelize`) therefore runs one and the same graph in its forward,
its recomputation and every later call.

The stack follows the blocks' step protocol (:mod:`unetlm.core.step`) with a list of their states.
"""
from __future__ import annotations

import torch
from torch import nn

from unetlm.core.layout import StageInfo
from unetlm.core.step import StepInfo
from unetlm.recipe.schema import Component


class Stack(nn.Module):
    def __init__(self, mixer: Component, dim: int, layers: int) -> None:
        super().__init__()
        cls = mixer.build_class()
        self.blocks = nn.ModuleList(cls(mixer.config, dim) for _ in range(layers))

    def mixers(self) -> list[nn.Module]:
        """The mixer of each block, seen through any wrapper parallelism put around it."""
        return [getattr(block, "_checkpoint_wrapped_module", block) for block in self.blocks]

    def forward(self, h: torch.Tensor, info: StageInfo) -> torch.Tensor:
        if info.shared is None:
            info.shared = {}
        memo = info.shared
        for mixer in self.mixers():
            mixer.prepare(info, memo)
        for block in self.blocks:
            h = block(h, info, memo)
        return h

    def init_state(self, batch: int, max_len: int, device, dtype) -> list:
        return [block.init_state(batch, max_len, device, dtype) for block in self.mixers()]

    def step(self, h: torch.Tensor, states: list, info: StepInfo) -> tuple[torch.Tensor, list]:
        return self._chain("step", h, states, info)

    def prefill(self, h: torch.Tensor, states: list, info: StageInfo) -> tuple[torch.Tensor, list]:
        return self._chain("prefill", h, states, info)

    def _chain(self, method: str, h: torch.Tensor, states: list, info) -> tuple[torch.Tensor, list]:
        """``h`` through every block's ``method`` (step or prefill), each with its own state."""
        new = []
        for block, state in zip(self.mixers(), states):
            h, state = getattr(block, method)(h, state, info)
            new.append(state)
        return h, new

    def forward_flops(self, length: int) -> float:
        return sum(block.forward_flops(length) for block in self.mixers())
