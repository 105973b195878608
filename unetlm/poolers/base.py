"""Pooler contract.

``forward(h, link)`` maps fine vectors (B, Lf, d_fine) to coarse vectors (B, Lc, d_coarse).
Coarse vector k may read only fine positions j <= link.coarse_src[k] of its own document.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from unetlm.model.layout import Link
from unetlm.splitters.base import NoOptions


class Pooler(nn.Module):
    Config: ClassVar[type] = NoOptions
    examples: ClassVar[list[dict]] = [{}]

    def __init__(self, config, fine_dim: int, coarse_dim: int) -> None:
        super().__init__()
        self.config = config
        self.fine_dim, self.coarse_dim = fine_dim, coarse_dim

    def forward(self, h: torch.Tensor, link: Link) -> torch.Tensor:
        raise NotImplementedError

    def forward_flops(self, fine_len: int, coarse_len: int) -> float:
        """Forward FLOPs for one sequence (matmuls counted as 2 per multiply-add)."""
        return 2.0 * self.fine_dim * self.coarse_dim * coarse_len
