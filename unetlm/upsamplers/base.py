"""Upsampler contract.

``forward(coarse, link, fine=None)`` maps coarse vectors (B, Lc, d_coarse) to fine vectors
(B, Lf, d_fine). Fine position j may receive only coarse vectors whose boundary is at or before
j in its own document: index ``link.fine_seg[j] - 1`` (the newest) and older ones, or, where
``fine_seg`` is 0, a learned start vector. ``fine`` (B, Lf, d_fine) is the finer stage's encoder
output (the skip); an upsampler may read ``fine[j]`` at position j (e.g. as attention queries).
Most subclasses ignore it, project the coarse side, then :meth:`spread` it.

Step protocol (cached generation, one document per row; see :mod:`unetlm.core.step`):
``init_state(batch, max_len, device, dtype)`` (only the start vector seen); ``step(coarse
(B, d_coarse), state, info: LinkStep, fine (B, d_fine))`` for one new fine position, where
``coarse`` is the coarse stage's new output on rows where ``info.fire`` (that position is its
boundary; None when no row fires) -> (the fine vector ``forward`` gives there, state);
``prefill(coarse, state, link, fine)`` -> (``forward``'s output, the state after each row's
valid fine positions). The default ``prefill`` runs ``step`` over the positions.
:class:`NewestUpsampler` implements the protocol for upsamplers that read the newest coarse
vector only.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from unetlm.core.layout import Link
from unetlm.core.options import NoOptions
from unetlm.core.step import LinkStep, at_last, link_steps, prefill_by_steps


class Upsampler(nn.Module):
    Config: ClassVar[type] = NoOptions
    examples: ClassVar[list[dict]] = [{}]

    def __init__(self, config, coarse_dim: int, fine_dim: int) -> None:
        super().__init__()
        self.config = config
        self.coarse_dim, self.fine_dim = coarse_dim, fine_dim
        self.start = nn.Parameter(torch.empty(coarse_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.start)

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

    def init_state(self, batch: int, max_len: int, device, dtype):
        """Step state before any coarse vector: rows see the start vector."""
        raise NotImplementedError

    def step(self, coarse: torch.Tensor | None, state, info: LinkStep, fine: torch.Tensor | None = None):
        """-> ((B, d_fine) for the new fine position, state)."""
        raise NotImplementedError

    def prefill(self, coarse: torch.Tensor, state, link: Link, fine: torch.Tensor | None = None):
        """coarse (B, Lc, d_coarse), fine (B, Lf, d_fine) from a fresh ``state`` -> (``forward``'s
        output, the state after each row's valid fine positions)."""
        out = self.forward(coarse, link, fine=fine)
        newest = self.spread(self.with_start(coarse), link)  # each fine position's newest coarse vector
        fines = fine.unbind(1) if fine is not None else [None] * newest.shape[1]
        state = prefill_by_steps(
            lambda x, st, info: self.step(x[0] if info.any_fire else None, st, info, fine=x[1]),
            state, zip(newest.unbind(1), fines), link_steps(link),
        )
        return out, state


class NewestUpsampler(Upsampler):
    """An upsampler whose fine vector reads the newest visible coarse vector only: subclasses
    implement :meth:`prepare` (the work on the coarse vector alone, done once per vector) and
    :meth:`read` (the fine vector at an offset); the state is the prepared newest vector."""

    def prepare(self, coarse: torch.Tensor) -> torch.Tensor:
        """coarse (B, d_coarse) -> (B, ...)."""
        raise NotImplementedError

    def read(self, prepared: torch.Tensor, offset: torch.Tensor, fine: torch.Tensor | None) -> torch.Tensor:
        """-> (B, d_fine) at ``offset`` (B,) fine positions after the newest coarse vector's boundary."""
        raise NotImplementedError

    def init_state(self, batch: int, max_len: int, device, dtype):
        return self.prepare(self.start.to(dtype).expand(batch, -1))

    def step(self, coarse, state, info: LinkStep, fine=None):
        if coarse is not None:
            state = torch.where(info.fire.view(-1, *([1] * (state.dim() - 1))), self.prepare(coarse), state)
        return self.read(state, info.offset, fine), state

    def prefill(self, coarse: torch.Tensor, state, link: Link, fine: torch.Tensor | None = None):
        newest = at_last(self.spread(self.with_start(coarse), link), link.fine)  # what the last position sees
        return self.forward(coarse, link, fine=fine), self.prepare(newest)
