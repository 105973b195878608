"""Pooler contract.

``forward(h, link)`` maps fine vectors (B, Lf, d_fine) to coarse vectors (B, Lc, d_coarse).
Coarse vector k may read only fine positions j <= link.coarse_src[k] of its own document.

Step API (cached generation, one document per row): ``init_state`` opens an empty segment;
``step`` adds one fine position to it and, on rows where the next stage fires, returns the
coarse vector ``forward`` gives for that boundary and opens the next segment.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from unetlm.core.layout import Link
from unetlm.core.options import NoOptions


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

    def init_state(self, batch: int, device, dtype):
        """An empty open segment per row."""
        raise NotImplementedError

    def step(self, h: torch.Tensor, state, write: torch.Tensor, fire: torch.Tensor | None):
        """h (B, d_fine): a new fine position on rows where ``write`` (B,) is True. ``fire`` (B,)
        marks rows whose position is a kept boundary (a subset of ``write``), or is None when no
        row has one. -> (coarse (B, d_coarse), meaningful on ``fire`` rows, or None; state)."""
        raise NotImplementedError
