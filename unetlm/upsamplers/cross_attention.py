"""Cross-attention upsampling (BLT's local decoder cross-attention).

Fine position j queries (from ``fine[j]``, the finer stage's encoder output) the ``window``
newest coarse vectors it may see: indices ``fine_seg[j] - 1``, ``fine_seg[j] - 2``, ... of its
own document, each projected to ``keys`` key/value pairs (BLT's ``cross_attn_k``); where
``fine_seg[j]`` is 0 it sees only the learned start vector. ``window = 1`` is BLT's decoder
mask (each byte attends to the one patch it may see). Keys are gathered per position, so the
cost is ``Lf * window * keys``, with no dense (Lf x Lc) mask. Step by step, the keys and
values of the ``window`` newest coarse vectors are kept (:meth:`step` shifts a new one in).
"""
from __future__ import annotations

import attrs
import torch
from einops import rearrange
from torch import nn

from unetlm.core.layout import Link
from unetlm.core.step import LinkStep, at_last
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.validators import positive
from unetlm.upsamplers.base import Upsampler


@attrs.define
class CrossAttentionConfig:
    heads: int = attrs.field(default=4, validator=positive)
    head_dim: int | None = attrs.field(default=None, validator=positive)  # default: fine dim // heads
    window: int = attrs.field(default=1, validator=positive)  # newest visible coarse vectors per query
    keys: int = attrs.field(default=1, validator=positive)  # key/value pairs per coarse vector

    def check_shapes(self, path: str, dim: int, fine_dim: int) -> None:
        if self.head_dim is None and fine_dim % self.heads:
            raise RecipeError(
                f"{path}.heads = {self.heads} is invalid: it must divide the finer stage's dim {fine_dim} "
                f"(or set head_dim)"
            )

    def head_size(self, fine_dim: int) -> int:
        return self.head_dim if self.head_dim is not None else fine_dim // self.heads


class CrossAttentionUpsampler(Upsampler):
    Config = CrossAttentionConfig
    examples = [{"heads": 2}, {"heads": 2, "window": 3, "keys": 2}]

    def __init__(self, config: CrossAttentionConfig, coarse_dim: int, fine_dim: int) -> None:
        super().__init__(config, coarse_dim, fine_dim)
        self.heads, self.head_dim = config.heads, config.head_size(fine_dim)
        inner = self.heads * self.head_dim
        self.q_norm = nn.RMSNorm(fine_dim, eps=1e-6)
        self.q = nn.Linear(fine_dim, inner, bias=False)
        self.kv_norm = nn.RMSNorm(coarse_dim, eps=1e-6)
        self.kv = nn.Linear(coarse_dim, config.keys * 2 * inner, bias=False)
        self.out = nn.Linear(inner, fine_dim, bias=False)

    def visible(self, link: Link) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (B, Lf, window) into the start-extended coarse side, allowed (B, Lf, window))."""
        back = torch.arange(self.config.window, device=link.fine_seg.device)
        index = link.fine_seg.unsqueeze(-1) - back  # newest first
        clamped = index.clamp(min=1) - 1
        same_doc = link.coarse.doc.gather(1, clamped.flatten(1)).view_as(index) == link.fine.doc.unsqueeze(-1)
        allowed = (back == 0) | ((index >= 1) & same_doc)
        return index.clamp(min=0), allowed

    def forward(self, coarse: torch.Tensor, link: Link, fine: torch.Tensor | None = None) -> torch.Tensor:
        if fine is None:
            raise ValueError("the cross-attention upsampler needs the fine encoder states (fine=...) as queries")
        B, Lf, _ = fine.shape
        H, W, K = self.heads, self.config.window, self.config.keys
        kv = self.kv(self.kv_norm(self.with_start(coarse)))  # (B, Lc + 1, K * 2 * H * hd)
        index, allowed = self.visible(link)
        picked = kv.gather(1, index.view(B, Lf * W, 1).expand(-1, -1, kv.shape[-1]))
        k, v = rearrange(picked, "b (l w) (k two h d) -> two b l (w k) h d", w=W, k=K, two=2, h=H)
        q = rearrange(self.q(self.q_norm(fine)), "b l (h d) -> b l h d", h=H)
        return self._attend(q, k, v, allowed.repeat_interleave(K, dim=-1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q (..., H, hd), k/v (..., N, H, hd), allowed (..., N) -> (..., fine_dim)."""
        scores = torch.einsum("...hd,...nhd->...hn", q, k) * self.head_dim**-0.5
        weights = scores.masked_fill(~allowed.unsqueeze(-2), float("-inf")).softmax(-1)
        mixed = torch.einsum("...hn,...nhd->...hd", weights, v)
        return self.out(mixed.flatten(-2))

    def init_state(self, batch: int, max_len: int, device, dtype):
        """(key/values of the newest coarse vectors (B, window, ...), newest first; which slots
        hold one (B, window); whether any coarse vector came yet (B,)). At first: the start vector."""
        W = self.config.window
        start = self.kv(self.kv_norm(self.start.to(dtype))).expand(batch, -1)
        kv = torch.cat([start.unsqueeze(1), start.new_zeros(batch, W - 1, start.shape[-1])], 1)
        slots = torch.arange(W, device=device).expand(batch, W) == 0
        return kv, slots, torch.zeros(batch, dtype=torch.bool, device=device)

    def step(self, coarse, state, info: LinkStep, fine=None):
        kv, slots, seen = state
        if coarse is not None:  # the new coarse vector shifts in on rows where it fired
            new = self.kv(self.kv_norm(coarse)).unsqueeze(1)
            older = slots[:, :-1] & seen.unsqueeze(1)  # the start vector leaves once a coarse vector came
            f = info.fire.view(-1, 1)
            kv = torch.where(f.unsqueeze(-1), torch.cat([new, kv[:, :-1]], 1), kv)
            slots = torch.where(f, torch.cat([torch.ones_like(slots[:, :1]), older], 1), slots)
            seen = seen | info.fire
        B, H, hd, K = fine.shape[0], self.heads, self.head_dim, self.config.keys
        k, v = kv.view(B, self.config.window * K, 2, H, hd).unbind(2)
        q = self.q(self.q_norm(fine)).view(B, H, hd)
        return self._attend(q, k, v, slots.repeat_interleave(K, dim=-1)), (kv, slots, seen)

    def prefill(self, coarse: torch.Tensor, state, link: Link, fine: torch.Tensor | None = None):
        """The forward pass; the state holds what the last valid fine position of each row sees."""
        index, allowed = (at_last(t, link.fine) for t in self.visible(link))  # (B, window)
        kv = self.kv(self.kv_norm(self.with_start(coarse)))
        kv = kv.gather(1, index.unsqueeze(-1).expand(-1, -1, kv.shape[-1]))
        return self.forward(coarse, link, fine=fine), (kv, allowed, at_last(link.fine_seg, link.fine) > 0)

    def forward_flops(self, fine_len: int, coarse_len: int) -> float:
        inner = self.heads * self.head_dim
        K, W = self.config.keys, self.config.window
        kv = 2.0 * self.coarse_dim * K * 2 * inner * (coarse_len + 1)
        q_out = 2.0 * fine_len * (self.fine_dim * inner + inner * self.fine_dim)
        return kv + q_out + 4.0 * fine_len * inner * W * K
