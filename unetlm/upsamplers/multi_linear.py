"""A shared linear map plus one linear map per offset inside the segment (AU-Net).

The fine position j at offset o = j - boundary gets ``(W_shared + W_o) c``. As in the paper's
code there are 16 offset maps and a shared one. Offsets past the last map wrap round with
``offset_mode = "modulo"`` (map o mod 16, as lingua's AU-Net does) or reuse the last map with
``"clamp"`` (the default: offset 16 is not confused with offset 0). Offsets count from the
position's own document (see :class:`unetlm.core.layout.Link`). All offset maps run as one
matmul on the (short) coarse side, then one gather picks, for each fine position, its
(segment, offset) row: no Python loop, no host synchronisation. With ``norm = true`` the
coarse vectors pass an RMSNorm before both maps, as lingua's AU-Net normalises before its
upsampling projection.
"""
from __future__ import annotations

from typing import Literal

import attrs
import torch
from einops import rearrange
import torch.nn.functional as F
from torch import nn

from unetlm.core.layout import Link
from unetlm.recipe.validators import positive
from unetlm.upsamplers.base import NewestUpsampler


@attrs.define
class MultiLinearConfig:
    offsets: int = attrs.field(default=16, validator=positive)
    norm: bool = False  # RMSNorm of each coarse vector (and the start vector) before the maps
    offset_mode: Literal["clamp", "modulo"] = "clamp"  # offsets past the last map: reuse it, or wrap round

    def map_of(self, offset: torch.Tensor) -> torch.Tensor:
        """The offset map (0 .. offsets - 1) that serves each offset."""
        if self.offset_mode == "modulo":
            return offset % self.offsets
        return offset.clamp(max=self.offsets - 1)


class MultiLinearUpsampler(NewestUpsampler):
    Config = MultiLinearConfig
    examples = [{}, {"offsets": 2, "norm": True}, {"offsets": 2, "offset_mode": "modulo"}]

    def __init__(self, config: MultiLinearConfig, coarse_dim: int, fine_dim: int) -> None:
        super().__init__(config, coarse_dim, fine_dim)
        self.norm = nn.RMSNorm(coarse_dim, eps=1e-5) if config.norm else nn.Identity()
        self.shared = nn.Linear(coarse_dim, fine_dim, bias=False)
        self.per_offset = nn.Linear(coarse_dim, fine_dim * config.offsets, bias=False)

    def forward(self, coarse: torch.Tensor, link: Link, fine: torch.Tensor | None = None) -> torch.Tensor:
        ext = self.norm(self.with_start(coarse))  # (B, Lc+1, dc)
        K, df = self.config.offsets, self.fine_dim
        by_offset = rearrange(self.per_offset(ext), "b s (k f) -> b (s k) f", k=K)
        index = link.fine_seg * K + self.config.map_of(link.fine_offset)
        picked = by_offset.gather(1, index.unsqueeze(-1).expand(-1, -1, df))
        return picked + self.spread(self.shared(ext), link)

    def prepare(self, coarse: torch.Tensor) -> torch.Tensor:
        """(B, dc) -> (B, df + dc): the shared map's output, then the coarse vector itself (each
        step applies the one offset map it needs: a segment rarely uses all of them)."""
        coarse = self.norm(coarse)
        return torch.cat([self.shared(coarse), coarse], dim=-1)

    def read(self, prepared: torch.Tensor, offset: torch.Tensor, fine: torch.Tensor | None) -> torch.Tensor:
        shared, coarse = prepared.split([self.fine_dim, self.coarse_dim], dim=-1)
        maps = rearrange(self.per_offset.weight, "(k f) c -> k f c", k=self.config.offsets)
        offset = self.config.map_of(offset)
        if bool((offset == offset[0]).all()):  # one map for every row: no copy of it
            picked = F.linear(coarse, maps[int(offset[0])])
        else:
            picked = torch.bmm(maps[offset], coarse.unsqueeze(-1)).squeeze(-1)
        return picked + shared

    def forward_flops(self, fine_len: int, coarse_len: int) -> float:
        return 2.0 * self.coarse_dim * self.fine_dim * (self.config.offsets + 1) * (coarse_len + 1)
