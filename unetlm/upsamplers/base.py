"""Upsampler contract.

``forward(coarse, link)`` maps coarse vectors (B, Lc, d_coarse) to fine vectors
(B, Lf, d_fine). Fine position j may receive only coarse vector ``link.fine_seg[j] - 1``
(whose boundary is at or before j, in the same document) or, where ``fine_seg`` is 0, a
learned start vector. Subclasses project the coarse side, then :meth:`spread` it.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from unetlm.model.layout import Link
from unetlm.splitters.base import NoOptions


class Upsampler(nn.Module):
    Config: ClassVar[type] = NoOptions
    examples: ClassVar[list[dict]] = [{}]

    def __init__(self, config, coarse_dim: int, fine_dim: int) -> None:
        super().__init__()
        self.config = config
        self.coarse_dim, self.fine_dim = coarse_dim, fine_dim
        self.start = nn.Parameter(torch.zeros(coarse_dim))

    def with_start(self, coarse: torch.Tensor) -> torch.Tensor:
        """(B, Lc, d) -> (B, Lc + 1, d) with the learned start vector at index 0."""
        start = self.start.to(coarse.dtype).expand(coarse.shape[0], 1, -1)
        return torch.cat([start, coarse], dim=1)

    @staticmethod
    def spread(extended: torch.Tensor, link: Link) -> torch.Tensor:
        """Gather (B, Lc + 1, *rest) at ``link.fine_seg`` -> (B, Lf, *rest)."""
        B, Lf = link.fine_seg.shape
        index = link.fine_seg.view(B, Lf, *([1] * (extended.dim() - 2)))
        return extended.gather(1, index.expand(B, Lf, *extended.shape[2:]))

    def forward(self, coarse: torch.Tensor, link: Link) -> torch.Tensor:
        raise NotImplementedError

    def forward_flops(self, fine_len: int, coarse_len: int) -> float:
        return 2.0 * self.coarse_dim * self.fine_dim * (coarse_len + 1)
