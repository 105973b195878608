"""Take the fine vector at each boundary, then a linear map to the coarse dim (AU-Net)."""
from __future__ import annotations

import torch
from torch import nn

from unetlm.core.layout import Link
from unetlm.core.step import LinkStep
from unetlm.poolers.base import Pooler


class SelectPooler(Pooler):
    def __init__(self, config, fine_dim: int, coarse_dim: int) -> None:
        super().__init__(config, fine_dim, coarse_dim)
        self.proj = nn.Linear(fine_dim, coarse_dim, bias=False)

    def forward(self, h: torch.Tensor, link: Link) -> torch.Tensor:
        index = link.coarse_src.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return self.proj(h.gather(1, index))

    def init_state(self, batch: int, max_len: int, device, dtype) -> None:
        return None

    def step(self, h: torch.Tensor, state, info: LinkStep):
        return (self.proj(h) if info.any_fire else None), state

    def prefill(self, h: torch.Tensor, state, link: Link):
        return self.forward(h, link), state
