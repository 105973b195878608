"""Cross-attention pooling (BLT's local-encoder pooling).

Coarse vector k starts from the fine vector at its boundary (linearly mapped to the coarse
dim); as a multi-head query it attends to the fine vectors of its own patch: the positions
after the previous boundary up to and including its boundary, in its document. So it reads
fine positions <= coarse_src[k] only. The patch mask is a segment softmax over
:func:`~unetlm.poolers.mean.segment_of` (each fine position belongs to exactly one patch), so
the cost grows with the fine length, not with fine x coarse, and nothing syncs with the host.
Step by step, the keys and values of each row's open patch are kept until its boundary.
"""
from __future__ import annotations

import attrs
import torch
from einops import rearrange
from torch import nn
from torch_geometric.utils import scatter, softmax

from unetlm.core.layout import Link
from unetlm.core.step import LinkStep
from unetlm.poolers.base import Pooler
from unetlm.poolers.mean import open_segment, segment_of
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.validators import positive


@attrs.define
class CrossAttentionConfig:
    heads: int = attrs.field(default=4, validator=positive)
    head_dim: int | None = attrs.field(default=None, validator=positive)  # default: dim // heads

    def check_shapes(self, path: str, dim: int, fine_dim: int) -> None:
        if self.head_dim is None and dim % self.heads:
            raise RecipeError(
                f"{path}.heads = {self.heads} is invalid: it must divide the stage dim {dim} (or set head_dim)"
            )

    def head_size(self, dim: int) -> int:
        return self.head_dim if self.head_dim is not None else dim // self.heads


class CrossAttentionPooler(Pooler):
    Config = CrossAttentionConfig
    examples = [{"heads": 2}, {"heads": 1, "head_dim": 8}]

    def __init__(self, config: CrossAttentionConfig, fine_dim: int, coarse_dim: int) -> None:
        super().__init__(config, fine_dim, coarse_dim)
        self.heads, self.head_dim = config.heads, config.head_size(coarse_dim)
        inner = self.heads * self.head_dim
        self.init = nn.Linear(fine_dim, coarse_dim, bias=False)
        self.q_norm = nn.RMSNorm(coarse_dim, eps=1e-6)
        self.q = nn.Linear(coarse_dim, inner, bias=False)
        self.kv_norm = nn.RMSNorm(fine_dim, eps=1e-6)
        self.kv = nn.Linear(fine_dim, 2 * inner, bias=False)
        self.out = nn.Linear(inner, coarse_dim, bias=False)

    def forward(self, h: torch.Tensor, link: Link) -> torch.Tensor:
        B, Lf, d = h.shape
        Lc = link.coarse_src.shape[1]
        H, hd = self.heads, self.head_dim
        query = self.init(h.gather(1, link.coarse_src.unsqueeze(-1).expand(-1, -1, d)))  # (B, Lc, dc)
        q = rearrange(self.q(self.q_norm(query)), "b c (h d) -> b c h d", h=H)
        k, v = rearrange(self.kv(self.kv_norm(h)), "b l (two h d) -> two b l h d", two=2, h=H)
        segment = segment_of(link)  # (B, Lf) in [0, Lc]; Lc = no patch
        q_ext = torch.cat([q, q.new_zeros(B, 1, H, hd)], dim=1)
        q_at = q_ext.gather(1, segment.view(B, Lf, 1, 1).expand(B, Lf, H, hd))  # each position's patch query
        scores = (q_at * k).sum(-1) * hd**-0.5  # (B, Lf, H)
        flat = (segment + torch.arange(B, device=h.device)[:, None] * (Lc + 1)).reshape(-1)
        weights = softmax(scores.reshape(B * Lf, H), flat, num_nodes=B * (Lc + 1))
        mixed = scatter(weights.unsqueeze(-1) * v.reshape(B * Lf, H, hd), flat, dim=0, dim_size=B * (Lc + 1))
        return query + self.out(rearrange(mixed, "(b c) h d -> b c (h d)", b=B)[:, :Lc])

    def init_state(self, batch: int, max_len: int, device, dtype):
        """(keys, values (B, max_len, H, hd) by fine position; where each row's open patch starts (B,))."""
        kv = torch.zeros(batch, max_len, self.heads, self.head_dim, device=device, dtype=dtype)
        return kv, kv.clone(), torch.zeros(batch, dtype=torch.long, device=device)

    def step(self, h: torch.Tensor, state, info: LinkStep):
        k, v, open_from = state
        B, pos = h.shape[0], info.fine.pos
        k_new, v_new = self.kv(self.kv_norm(h)).view(B, 2, self.heads, self.head_dim).unbind(1)
        rows = info.fine.write.nonzero().squeeze(1)  # written in place: only rows that advance
        k[rows, pos[rows]], v[rows, pos[rows]] = k_new[rows], v_new[rows]
        if not info.any_fire:
            return None, (k, v, open_from)
        query = self.init(h)
        q = self.q(self.q_norm(query)).view(B, self.heads, self.head_dim)
        lo, hi = int(open_from[info.fire].min()), int(pos[info.fire].max()) + 1
        cols = torch.arange(lo, hi, device=h.device)
        seen = (cols >= open_from[:, None]) & (cols <= pos[:, None])
        seen = seen | ~info.fire[:, None]  # rows not firing: any finite numbers
        scores = torch.einsum("bhd,bnhd->bhn", q, k[:, lo:hi]) * self.head_dim**-0.5
        weights = scores.masked_fill(~seen.unsqueeze(1), float("-inf")).softmax(-1)
        pooled = query + self.out(torch.einsum("bhn,bnhd->bhd", weights, v[:, lo:hi]).reshape(B, -1))
        return pooled, (k, v, torch.where(info.fire, pos + 1, open_from))

    def prefill(self, h: torch.Tensor, state, link: Link):
        k, v, _ = state
        B, Lf, _ = h.shape
        k_all, v_all = self.kv(self.kv_norm(h)).view(B, Lf, 2, self.heads, self.head_dim).unbind(2)
        k[:, :Lf], v[:, :Lf] = k_all, v_all
        open_from = link.fine.valid.sum(1) - open_segment(link).sum(1)
        return self.forward(h, link), (k, v, open_from)

    def forward_flops(self, fine_len: int, coarse_len: int) -> float:
        inner = self.heads * self.head_dim
        dc, df = self.coarse_dim, self.fine_dim
        projections = 2.0 * coarse_len * (df * dc + dc * inner + inner * dc) + 2.0 * fine_len * df * 2 * inner
        return projections + 4.0 * fine_len * inner  # each fine position meets exactly one query
