"""Concatenation pooling (MegaByte's patch embedding; Hourglass's linear pooling).

Coarse vector k is a linear map of the ``size`` fine vectors ending at its boundary
``s = coarse_src[k]``: slot i holds position ``s - size + 1 + i``. Slots before the start of
the patch (at or before the previous boundary, or in another document) are zero, so coarse k
reads fine positions <= s of its own patch only. Step by step, the last ``size`` vectors and
the length of the open patch are kept.
"""
from __future__ import annotations

import attrs
import torch
from torch import nn

from unetlm.core.layout import Link
from unetlm.core.step import LinkStep
from unetlm.poolers.base import Pooler
from unetlm.poolers.mean import open_segment, segment_of
from unetlm.recipe.validators import positive


@attrs.define
class ConcatConfig:
    size: int = attrs.field(default=4, validator=positive)  # fine vectors per coarse vector


class ConcatPooler(Pooler):
    Config = ConcatConfig
    examples = [{"size": 1}, {"size": 3}]

    def __init__(self, config: ConcatConfig, fine_dim: int, coarse_dim: int) -> None:
        super().__init__(config, fine_dim, coarse_dim)
        self.proj = nn.Linear(fine_dim * config.size, coarse_dim, bias=False)

    def forward(self, h: torch.Tensor, link: Link) -> torch.Tensor:
        B, Lf, d = h.shape
        Lc, K = link.coarse_src.shape[1], self.config.size
        pos = link.coarse_src.unsqueeze(-1) - torch.arange(K - 1, -1, -1, device=h.device)  # (B, Lc, K)
        index = pos.clamp(min=0).view(B, Lc * K)
        own = torch.arange(Lc, device=h.device).view(1, Lc, 1)
        inside = (pos >= 0) & (segment_of(link).gather(1, index).view(B, Lc, K) == own)
        picked = h.gather(1, index.unsqueeze(-1).expand(-1, -1, d)).view(B, Lc, K, d)
        return self.proj((picked * inside.unsqueeze(-1).to(h.dtype)).flatten(2))

    def init_state(self, batch: int, max_len: int, device, dtype):
        """(the last ``size`` fine vectors (B, size, d), right-aligned; the open patch's length (B,))."""
        return (
            torch.zeros(batch, self.config.size, self.fine_dim, device=device, dtype=dtype),
            torch.zeros(batch, dtype=torch.long, device=device),
        )

    def step(self, h: torch.Tensor, state, info: LinkStep):
        recent, length = state
        recent, length = torch.cat([recent[:, 1:], h.unsqueeze(1)], 1), length + 1
        if not info.any_fire:
            return None, (recent, length)
        K = self.config.size
        inside = torch.arange(K, device=h.device) >= K - length.unsqueeze(1)
        pooled = self.proj((recent * inside.unsqueeze(-1).to(recent.dtype)).flatten(1))
        return pooled, (recent, length.masked_fill(info.fire, 0))

    def prefill(self, h: torch.Tensor, state, link: Link):
        K = self.config.size
        pos = link.fine.valid.sum(1, keepdim=True) - K + torch.arange(K, device=h.device)  # (B, K)
        recent = h.gather(1, pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        recent = recent * (pos >= 0).unsqueeze(-1).to(h.dtype)
        return self.forward(h, link), (recent, open_segment(link).sum(1))

    def forward_flops(self, fine_len: int, coarse_len: int) -> float:
        return 2.0 * self.config.size * self.fine_dim * self.coarse_dim * coarse_len
