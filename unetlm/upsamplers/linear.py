"""One shared linear map from the coarse dim to the fine dim, applied before spreading."""
from __future__ import annotations

import torch
from torch import nn

from unetlm.core.layout import Link
from unetlm.upsamplers.base import NewestUpsampler


class LinearUpsampler(NewestUpsampler):
    def __init__(self, config, coarse_dim: int, fine_dim: int) -> None:
        super().__init__(config, coarse_dim, fine_dim)
        self.proj = nn.Linear(coarse_dim, fine_dim, bias=False)

    def forward(self, coarse: torch.Tensor, link: Link, fine: torch.Tensor | None = None) -> torch.Tensor:
        return self.spread(self.proj(self.with_start(coarse)), link)

    def prepare(self, coarse: torch.Tensor) -> torch.Tensor:
        return self.proj(coarse)

    def read(self, prepared: torch.Tensor, offset: torch.Tensor, fine: torch.Tensor | None) -> torch.Tensor:
        return prepared
