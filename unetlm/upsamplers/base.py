"""Upsampler contract.

``forward(coarse, link, fine=None)`` maps coarse vectors (B, Lc, d_coarse) to fine vectors
(B, Lf, d_fine). Fine position j may receive only coarse vectors whose boundary is at or before
j in its own document: index ``link.fine_seg[j] - 1`` (the newest) and older ones, or, where
``fine_seg`` is 0, a learned start vector. ``fine`` (B, Lf, d_fine) is the finer stage's encoder
output (the skip); an upsampler may read ``fine[j]`` at position j (e.g. as attention queries).
Most subclasses ignore it, project the coarse side, then :meth:`spread` it.

Step API (cached generation, one document per row): ``init_state`` (only the start vector
seen), ``push`` (the coarse stage emitted a vector) and ``step`` (one new fine position) give
what ``forward`` gives there. An upsampler that reads only the newest coarse vector implements
``prepare`` (per-coarse-vector work, done once per vector) and ``step``; one that reads older
vectors keeps them in its own state by overriding ``init_state`` and ``push``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from unetlm.core.layout import Link
from unetlm.core.options import NoOptions


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

    def forward(self, coarse: torch.Tensor, link: Link, fine: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward_flops(self, fine_len: int, coarse_len: int) -> float:
        return 2.0 * self.coarse_dim * self.fine_dim * (coarse_len + 1)

    def init_state(self, batch: int, device, dtype):
        """Step state before any coarse vector: rows see the start vector."""
        return self.prepare(self.start.to(dtype).expand(batch, -1))

    def push(self, coarse: torch.Tensor, state, write: torch.Tensor):
        """A new coarse vector (B, d_coarse) on rows where ``write`` (B,) is True -> state."""
        new = self.prepare(coarse)
        return torch.where(write.view(-1, *([1] * (new.dim() - 1))), new, state)

    def prepare(self, coarse: torch.Tensor) -> torch.Tensor:
        """coarse (B, d_coarse) -> (B, ...): the work that depends on the coarse vector alone
        (upsamplers that read only the newest coarse vector implement this and :meth:`step`)."""
        raise NotImplementedError

    def step(self, state, offset: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        """-> (B, d_fine) for a new fine position: ``offset`` (B,) long fine positions after the
        newest coarse vector's boundary (before any: the position's own index); ``fine`` (B,
        d_fine) is the finer stage's encoder output there."""
        raise NotImplementedError
