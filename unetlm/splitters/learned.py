"""Learned chunking (H-Net's dynamic chunking): boundaries from the stage's own hidden states.

``forward(h (B, Lf, d), info) -> Chunking``: p_t = (1 - cos(W_q h_{t-1}, W_k h_t)) / 2 with W_q,
W_k starting at the identity, p = 1 at the first position of each document (BOS) and of each
row, and a boundary where p_t > 0.5. A boundary starts a chunk; under unetlm's convention its
coarse vector goes to positions at or after it, so with the ``select`` pooler a chunk is the
state at its first position and every position reads the chunk that contains it. The decision
at t reads h_{t-1} and h_t only, so it is causal when the encoder is.

Training signals, used by :class:`~unetlm.model.unet.UNet` when a stage's splitter is learned:

* :meth:`smooth`: an EMA over the chunk outputs before upsampling, z̄_c = P_c ẑ_c + (1 - P_c) z̄_{c-1}
  (P_c: p at chunk c's boundary; restarts at each document), causal over chunks;
* :meth:`confidence`: a straight-through multiplier on the upsampled output, forward value 1,
  gradient that of c_t = p_t at boundaries and 1 - p_t elsewhere;
* :meth:`ratio_loss`: weight · N/(N-1) · ((N-1)·F·G + (1-F)(1-G)), F the fraction of valid
  positions that are boundaries, G their mean p; smallest when F = G = 1/N.

The module lives in the model (an ``nn.Module``), so it has no byte-level ``boundaries``. For
cached generation it follows the step protocol of :class:`~unetlm.splitters.base.LearnedSplitter`:
the state holds W_q h of the previous position, p at the newest one and the newest smoothed chunk.
"""
from __future__ import annotations

from typing import NamedTuple

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from unetlm.core.layout import Link, StageInfo
from unetlm.core.step import StepInfo, at_last
from unetlm.splitters.base import Chunking, LearnedSplitter

__all__ = ["Chunking", "DynamicChunking", "LearnedConfig", "RouterState"]


KEEP_MAX = 1 - 1e-6  # P is clamped to this where 1 - P is a decay, so the log stays finite


def _above_one(_inst, attribute, value):
    if value <= 1.0:
        raise ValueError(f"expected a value above 1 for {attribute.name} (fine positions per chunk)")


def _non_negative(_inst, attribute, value):
    if value < 0:
        raise ValueError(f"expected a value >= 0 for {attribute.name}")


@attrs.define
class LearnedConfig:
    target_ratio: float = attrs.field(default=4.0, validator=_above_one)  # N: fine positions per chunk aimed at
    ratio_loss_weight: float = attrs.field(default=0.03, validator=_non_negative)  # H-Net's alpha


class RouterState(NamedTuple):
    """Step state of :class:`DynamicChunking`, per row."""

    query: torch.Tensor  # (B, d): W_q h of the previous position
    started: torch.Tensor  # (B,) bool: the row has a previous position
    prob: torch.Tensor  # (B,): p at the newest position (P of a chunk it starts)
    smoothed: torch.Tensor | None  # (B, d_coarse): the newest smoothed chunk output (None: zeros)


class DynamicChunking(LearnedSplitter):
    Config = LearnedConfig
    examples = [{}]

    def __init__(self, config: LearnedConfig, dim: int) -> None:
        super().__init__(config, dim)
        # plain parameters, so the model's normal initialisation leaves the identity in place
        self.w_q = nn.Parameter(torch.empty(dim, dim))
        self.w_k = nn.Parameter(torch.empty(dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.eye_(self.w_q)
        nn.init.eye_(self.w_k)

    @staticmethod
    def _dtype(h: torch.Tensor) -> torch.dtype:
        return torch.float64 if h.dtype == torch.float64 else torch.float32

    def probabilities(self, h: torch.Tensor, info: StageInfo) -> torch.Tensor:
        """(B, Lf) p_t from h_{t-1} and h_t; 1 where a document or the row starts, 0 at padding."""
        dtype = self._dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            x = h.to(dtype)
            q = x[:, :-1] @ self.w_q.to(dtype).T
            k = x[:, 1:] @ self.w_k.to(dtype).T
            p = ((1 - F.cosine_similarity(q, k, dim=-1)) / 2).clamp(0, 1)
        starts = info.doc[:, 1:] != info.doc[:, :-1]
        p = torch.cat([torch.ones_like(x[:, :1, 0]), torch.where(starts, 1.0, p)], dim=1)
        return torch.where(info.valid, p, 0.0)

    def forward(self, h: torch.Tensor, info: StageInfo) -> Chunking:
        p = self.probabilities(h, info)
        return Chunking(prob=p, boundary=(p > 0.5) & info.valid)

    def smooth(self, coarse: torch.Tensor, link: Link, chunking: Chunking) -> torch.Tensor:
        """EMA over chunk outputs (B, Lc, d) -> (B, Lc, d); z̄_c reads ẑ_i, P_i for i <= c of its document.

        Closed form: z̄_c = sum_i P_i prod_{i<m<=c} (1 - P_m) ẑ_i, the products as exponentials of
        differences of a cumulative sum of log(1 - P) (O(Lc^2) memory per row)."""
        P = chunking.prob.gather(1, link.coarse_src)
        log_keep = torch.log1p(-P.clamp(max=KEEP_MAX)).cumsum(1)  # document starts: reset by the mask below
        Lc = P.shape[1]
        doc = link.coarse.doc
        older = torch.ones(Lc, Lc, dtype=torch.bool, device=P.device).tril()
        visible = older & (doc[:, :, None] == doc[:, None, :])  # (B, c, i)
        diff = log_keep[:, :, None] - log_keep[:, None, :]
        weight = torch.where(visible, diff, float("-inf")).exp() * P[:, None, :]
        return weight.to(coarse.dtype) @ coarse

    @staticmethod
    def confidence(chunking: Chunking) -> torch.Tensor:
        """(B, Lf, 1) ones whose gradient is that of c_t (straight-through estimator)."""
        c = torch.where(chunking.boundary, chunking.prob, 1 - chunking.prob)
        return (c - c.detach() + 1).unsqueeze(-1)

    def ratio_loss(self, chunking: Chunking, info: StageInfo) -> torch.Tensor:
        """Weighted ratio loss over the valid positions of the fine stage (a scalar)."""
        n_target = self.config.target_ratio
        count = info.valid.sum().clamp(min=1)
        f = (chunking.boundary & info.valid).sum() / count
        g = chunking.prob.sum() / count  # p is 0 at padding
        loss = n_target / (n_target - 1) * ((n_target - 1) * f * g + (1 - f) * (1 - g))
        return self.config.ratio_loss_weight * loss

    # ---------------------------------------------------------------- step protocol

    def init_state(self, batch: int, max_len: int, device, dtype) -> RouterState:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return RouterState(
            query=torch.zeros(batch, self.dim, device=device, dtype=acc),
            started=torch.zeros(batch, dtype=torch.bool, device=device),
            prob=torch.ones(batch, device=device, dtype=acc),
            smoothed=None,
        )

    def step(self, h: torch.Tensor, state: RouterState, info: StepInfo) -> tuple[Chunking, RouterState]:
        dtype = self._dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            x = h.to(dtype)
            q, k = x @ self.w_q.to(dtype).T, x @ self.w_k.to(dtype).T
            p = ((1 - F.cosine_similarity(state.query, k, dim=-1)) / 2).clamp(0, 1)
        p = torch.where(state.started, p, 1.0)
        return Chunking(prob=p, boundary=p > 0.5), RouterState(q, torch.ones_like(state.started), p, state.smoothed)

    def prefill(self, h: torch.Tensor, state: RouterState, info: StageInfo) -> tuple[Chunking, RouterState]:
        chunking = self.forward(h, info)
        dtype = self._dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            q = at_last(h, info).to(dtype) @ self.w_q.to(dtype).T
        started = info.valid.any(1)
        return chunking, RouterState(q, started, at_last(chunking.prob, info).to(dtype), state.smoothed)

    def smooth_step(self, coarse: torch.Tensor, state: RouterState) -> tuple[torch.Tensor, RouterState]:
        """z̄ = P ẑ + (1 - P) z̄_prev, as :meth:`smooth` computes it for the newest chunk."""
        P = state.prob.to(coarse.dtype).unsqueeze(-1)
        out = P * coarse
        if state.smoothed is not None:
            out = out + (1 - P.clamp(max=KEEP_MAX)) * state.smoothed
        return out, state._replace(smoothed=out)

    def smooth_prefill(self, coarse: torch.Tensor, state: RouterState, link: Link, chunking: Chunking):
        smoothed = self.smooth(coarse, link, chunking)
        newest = at_last(smoothed, link.coarse) * link.coarse.valid.any(1, keepdim=True).to(smoothed.dtype)
        return smoothed, state._replace(smoothed=newest)
