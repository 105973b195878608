"""Take the fine vector at each boundary, then a linear map to the coarse dim (AU-Net).

With ``norm = true`` the taken vector passes an RMSNorm first: gather, RMSNorm, linear, as in
lingua's AU-Net. Coarse vector k reads fine position ``link.coarse_src[k]`` only.
"""
from __future__ import annotations

import attrs
import torch
from torch import nn

from unetlm.core.layout import Link
from unetlm.core.step import LinkStep
from unetlm.poolers.base import Pooler


@attrs.define
class SelectConfig:
    norm: bool = False  # RMSNorm of the taken fine vector before the linear map


class SelectPooler(Pooler):
    Config = SelectConfig
    examples = [{}, {"norm": True}]

    def __init__(self, config: SelectConfig, fine_dim: int, coarse_dim: int) -> None:
        super().__init__(config, fine_dim, coarse_dim)
        self.norm = nn.RMSNorm(fine_dim, eps=1e-5) if config.norm else nn.Identity()
        self.proj = nn.Linear(fine_dim, coarse_dim, bias=False)

    def forward(self, h: torch.Tensor, link: Link) -> torch.Tensor:
        index = link.coarse_src.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return self.proj(self.norm(h.gather(1, index)))

    def init_state(self, batch: int, max_len: int, device, dtype) -> None:
        return None

    def step(self, h: torch.Tensor, state, info: LinkStep):
        return (self.proj(self.norm(h)) if info.any_fire else None), state

    def prefill(self, h: torch.Tensor, state, link: Link):
        return self.forward(h, link), state
