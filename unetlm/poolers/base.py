"""Pooler contract.

``forward(h, link)`` maps fine vectors (B, Lf, d_fine) to coarse vectors (B, Lc, d_coarse).
Coarse vector k may read only fine positions j <= link.coarse_src[k] of its own document.

Step protocol (cached generation, one document per row; see :mod:`unetlm.core.step`):
``init_state(batch, max_len, device, dtype)`` opens an empty segment; ``step(h (B, d_fine),
state, info: LinkStep)`` adds one fine position to it and, on rows where ``info.fire``, returns
the coarse vector ``forward`` gives for that boundary (None when no row fires) and opens the
next segment; ``prefill(h, state, link)`` returns ``forward``'s output and the open segment
after each row's valid positions. The default ``prefill`` runs ``step`` over the positions.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from unetlm.core.layout import Link
from unetlm.core.options import NoOptions
from unetlm.core.step import LinkStep, link_steps, prefill_by_steps


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

    def init_state(self, batch: int, max_len: int, device, dtype):
        """An empty open segment per row."""
        raise NotImplementedError

    def step(self, h: torch.Tensor, state, info: LinkStep):
        """h (B, d_fine): the new fine position -> (coarse (B, d_coarse), meaningful on
        ``info.fire`` rows, or None when ``info.any_fire`` is False; state)."""
        raise NotImplementedError

    def prefill(self, h: torch.Tensor, state, link: Link):
        """h (B, Lf, d_fine) from a fresh ``state`` -> (``forward``'s output, the open segment
        after each row's valid positions)."""
        return self.forward(h, link), prefill_by_steps(self.step, state, h.unbind(1), link_steps(link))
