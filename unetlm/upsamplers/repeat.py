"""Copy each coarse vector over the fine positions of its segment (dims must match)."""
from __future__ import annotations

import attrs
import torch

from unetlm.core.layout import Link
from unetlm.recipe.errors import RecipeError
from unetlm.upsamplers.base import NewestUpsampler


@attrs.define
class RepeatConfig:
    def check_shapes(self, path: str, dim: int, fine_dim: int) -> None:
        if dim != fine_dim:
            raise RecipeError(
                f"{path}.name = 'repeat' is invalid: it copies vectors, so the stage dim ({dim}) must "
                f"equal the finer stage's dim ({fine_dim}); use 'linear' or 'multi-linear'"
            )


class RepeatUpsampler(NewestUpsampler):
    Config = RepeatConfig

    def forward(self, coarse: torch.Tensor, link: Link, fine: torch.Tensor | None = None) -> torch.Tensor:
        return self.spread(self.with_start(coarse), link)

    def prepare(self, coarse: torch.Tensor) -> torch.Tensor:
        return coarse

    def read(self, prepared: torch.Tensor, offset: torch.Tensor, fine: torch.Tensor | None) -> torch.Tensor:
        return prepared

    def forward_flops(self, fine_len: int, coarse_len: int) -> float:
        return 0.0
