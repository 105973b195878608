"""Mean over the segment that ends at each boundary, then a linear map.

Segment k holds the fine positions after boundary k-1 up to and including boundary k that
belong to the boundary's own document. The average uses torch_geometric's ``scatter`` (one
scatter-reduce over a flattened (batch, segment) index; no host synchronisation).
Step by step, a running sum and count of the open segment give the same mean.
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.utils import scatter

from unetlm.core.layout import Link
from unetlm.core.step import LinkStep
from unetlm.poolers.base import Pooler


def segment_of(link: Link) -> torch.Tensor:
    """(B, Lf) long: the coarse vector whose segment each fine position closes into (the first
    boundary at or after it), or Lc where none (padding, truncated, or another document)."""
    Lc = link.coarse_src.shape[1]
    is_b = link.fine_is_boundary.long()
    segment = is_b.cumsum(1) - is_b  # boundaries strictly before j = the segment j closes into
    clamped = segment.clamp(max=Lc - 1)
    keep = (
        (segment < Lc)
        & link.fine.valid
        & link.coarse.valid.gather(1, clamped)
        & (link.coarse.doc.gather(1, clamped) == link.fine.doc)
    )
    return torch.where(keep, segment, Lc)


class MeanPooler(Pooler):
    def __init__(self, config, fine_dim: int, coarse_dim: int) -> None:
        super().__init__(config, fine_dim, coarse_dim)
        self.proj = nn.Linear(fine_dim, coarse_dim, bias=False)

    def forward(self, h: torch.Tensor, link: Link) -> torch.Tensor:
        B, Lf, d = h.shape
        Lc = link.coarse_src.shape[1]
        flat = segment_of(link) + torch.arange(B, device=h.device)[:, None] * (Lc + 1)
        pooled = scatter(h.reshape(B * Lf, d), flat.reshape(-1), dim=0, dim_size=B * (Lc + 1), reduce="mean")
        return self.proj(pooled.view(B, Lc + 1, d)[:, :Lc])

    def init_state(self, batch: int, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum (B, d_fine), count (B, 1)) of the open segment."""
        return torch.zeros(batch, self.fine_dim, device=device, dtype=dtype), torch.zeros(
            batch, 1, device=device, dtype=dtype
        )

    def step(self, h: torch.Tensor, state, info: LinkStep):
        total, count = state[0] + h, state[1] + 1
        if not info.any_fire:
            return None, (total, count)
        pooled = self.proj(total / count)
        f = info.fire.unsqueeze(-1)
        return pooled, (total.masked_fill(f, 0), count.masked_fill(f, 0))

    def prefill(self, h: torch.Tensor, state, link: Link):
        inside = open_segment(link).unsqueeze(-1)
        total = (h * inside).sum(1)
        return self.forward(h, link), (total, inside.sum(1).to(total.dtype))


def open_segment(link: Link) -> torch.Tensor:
    """(B, Lf) bool: the valid fine positions after each row's last boundary (the segment a
    step-by-step pooler holds open after them)."""
    index = torch.arange(link.fine_is_boundary.shape[1], device=link.fine_is_boundary.device)
    last = torch.where(link.fine_is_boundary, index, -1).max(1, keepdim=True).values
    return link.fine.valid & (index > last)
