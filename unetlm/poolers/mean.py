"""Mean over the segment that ends at each boundary, then a linear map.

Segment k holds the fine positions after boundary k-1 up to and including boundary k that
belong to the boundary's own document. The average uses torch_geometric's ``scatter`` (one
scatter-reduce over a flattened (batch, segment) index; no host synchronisation).
"""
from __future__ import annotations

import torch
from torch import nn
from torch_geometric.utils import scatter

from unetlm.model.layout import Link
from unetlm.poolers.base import Pooler


class MeanPooler(Pooler):
    def __init__(self, config, fine_dim: int, coarse_dim: int) -> None:
        super().__init__(config, fine_dim, coarse_dim)
        self.proj = nn.Linear(fine_dim, coarse_dim, bias=False)

    def forward(self, h: torch.Tensor, link: Link) -> torch.Tensor:
        B, Lf, d = h.shape
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
        flat = torch.where(keep, segment, Lc) + torch.arange(B, device=h.device)[:, None] * (Lc + 1)
        pooled = scatter(h.reshape(B * Lf, d), flat.reshape(-1), dim=0, dim_size=B * (Lc + 1), reduce="mean")
        return self.proj(pooled.view(B, Lc + 1, d)[:, :Lc])
