"""Byte embedding: one learned vector per token (256 bytes + specials)."""
from __future__ import annotations

import torch
from torch import nn

from unetlm.model.tokens import VOCAB


class ByteEmbedding(nn.Module):
    """tokens (B, T) -> (B, T, dim). Position t reads token t only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(VOCAB, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table(tokens)
