"""The SwiGLU feed-forward of the attention and Mamba blocks, laid out like ``mamba_ssm``'s GatedMLP.

``fc1`` maps d to (value, gate), each ``hidden`` wide; ``fc2(value * silu(gate))`` maps back
to d. Position-wise: output t reads input t only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(dim: int, ratio: float, multiple_of: int = 8) -> int:
    """The hidden width for ``ratio``: int(2/3 * ratio * dim) (the parameters of a ratio-wide
    plain MLP), rounded up to a multiple of ``multiple_of``, at least one multiple. With ratio 4
    this is the Llama FeedForward width of lingua's ``FeedForward`` (``multiple_of = 256`` there)."""
    hidden = int(2 * ratio * dim / 3)
    return max(multiple_of, -(-hidden // multiple_of) * multiple_of)


class SwiGLU(nn.Module):
    """x (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(value * F.silu(gate))

    def forward_flops(self, length: int) -> float:
        """Matmul FLOPs over ``length`` positions: fc1 (2 d 2h) + fc2 (2 h d) per position."""
        return 6.0 * length * self.dim * self.hidden
