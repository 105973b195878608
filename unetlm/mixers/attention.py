"""Causal self-attention block: pre-RMSNorm, RoPE, SwiGLU MLP, optional sliding window.

Query i attends to keys j with j <= i, i - j < window (when window > 0) and the same
document (:func:`allowed_keys`). The block runs one exact path per device and stage, chosen by
:meth:`AttentionBlock.path` (:mod:`unetlm.mixers.attention_paths`), none with a dense L x L mask:
FlexAttention under a block mask on CUDA; on the CPU causal attention one document at a time
(the flash kernel's ``is_causal``) or, for a window shorter than the stage, block by block. Off
CUDA, ``backend = "flex"`` runs eager FlexAttention for inference only (it has no backward on
the CPU). Prefill of rows that hold one document each uses SDPA's ``is_causal`` on any device.
Step by step, a KV cache holds the keys (a ring buffer of exactly ``window`` slots for a sliding
window) and the same :func:`allowed_keys` rule picks the keys each query sees.
"""
from __future__ import annotations

from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from unetlm.core.step import StepInfo
from unetlm.mixers.base import Mixer
from unetlm.mixers.mlp import SwiGLU, swiglu_hidden
from unetlm.core.layout import StageInfo
from unetlm.mixers.attention_paths import (
    allowed_keys, banded_attention, block_mask_bytes, build_banded_mask, document_attention, document_starts,
    flex_attention, flex_block_mask,
)
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.validators import non_negative, positive


@attrs.define
class AttentionConfig:
    head_dim: int = attrs.field(default=64, validator=positive)
    heads: int | None = attrs.field(default=None, validator=positive)  # default: dim // head_dim
    window: int = attrs.field(default=0, validator=non_negative)  # keys per query; 0 = unlimited
    mlp_ratio: float = attrs.field(default=4.0, validator=positive)  # SwiGLU hidden = 2/3 * ratio * dim
    multiple_of: int = attrs.field(default=8, validator=positive)  # the SwiGLU hidden width rounds up to it
    rope_base: float = attrs.field(default=10000.0, validator=positive)
    backend: Literal["auto", "sdpa", "flex"] = "auto"

    def check_shapes(self, path: str, dim: int, fine_dim: int) -> None:
        if self.heads is None and dim % self.head_dim:
            raise RecipeError(
                f"{path}.head_dim = {self.head_dim} is invalid: it must divide the stage dim {dim} "
                f"(or set heads explicitly)"
            )
        if self.head_dim % 2:
            raise RecipeError(f"{path}.head_dim = {self.head_dim} is invalid: rotary embeddings need an even head_dim")

    def check_device(self, path: str, device_type: str, training: bool) -> None:
        """FlexAttention's backward runs on CUDA only; attention within packed documents without a
        window has an exact SDPA path on the CPU only (anything else would need a dense mask)."""
        if self.backend == "flex" and training and device_type != "cuda":
            raise RecipeError(
                f"{path}.backend = 'flex' is invalid on {device_type}: FlexAttention trains on CUDA only; "
                f"use 'auto' (flex on CUDA, sdpa elsewhere) or 'sdpa'"
            )
        if self.backend == "sdpa" and self.window == 0 and device_type != "cpu":
            raise RecipeError(
                f"{path}.backend = 'sdpa' is invalid on {device_type} without a window: SDPA keeps packed "
                f"documents apart without a dense mask on the CPU only; use 'auto' or 'flex'"
            )

    def n_heads(self, dim: int) -> int:
        return self.heads if self.heads is not None else dim // self.head_dim

    def mlp_hidden(self, dim: int) -> int:
        return swiglu_hidden(dim, self.mlp_ratio, self.multiple_of)


def rotary_tables(length: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd); cos/sin (L, hd/2): rotate channel pairs (i, i + hd/2)."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def mean_context(length: int, window: int) -> float:
    """Average number of keys a query attends to over a causal sequence (padding included)."""
    if window <= 0 or window >= length:
        return (length + 1) / 2
    full = window * (window + 1) / 2 + (length - window) * window
    return full / length


class AttentionBlock(Mixer):
    Config = AttentionConfig
    examples = [{"head_dim": 8}, {"head_dim": 8, "window": 3}]

    def __init__(self, config: AttentionConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.heads = config.n_heads(dim)
        self.head_dim = config.head_dim
        inner = self.heads * self.head_dim
        self.attn_norm = nn.RMSNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, config.mlp_hidden(dim))

    def path(self, device: torch.device, length: int) -> Literal["flex", "banded", "documents"]:
        """How this block attends over a stage of ``length`` positions on ``device``: "flex"
        (FlexAttention, a block mask), "banded" (SDPA block by block, a window shorter than the
        stage) or "documents" (SDPA's causal kernel one document at a time, the CPU's)."""
        choice = self.config.backend
        if choice == "auto":
            choice = "flex" if device.type == "cuda" else "sdpa"
        if choice == "flex" and device.type != "cuda":  # eager FlexAttention for inference only there
            eager_inference = not torch.compiler.is_compiling() and not torch.is_grad_enabled()
            choice = "flex" if eager_inference else "sdpa"
        if choice == "flex":
            return "flex"
        window = self.config.window
        return "banded" if 0 < window and (window < length or device.type != "cpu") else "documents"

    def mask_bytes(self, rows: int, length: int) -> int:
        """FlexAttention's block mask (documents and starts need no more than the measured activations)."""
        return block_mask_bytes(rows, length) if self.path(torch.device("cuda"), length) == "flex" else 0

    def _keys(self, info: StageInfo):
        """memo keys of this block's rotary table and of what its path reads (blocks of one shape
        share them), and the path."""
        path = self.path(info.doc.device, info.length)
        rope = ("rotary", info.length, self.head_dim, self.config.rope_base)
        shared = ("document-starts",) if path == "documents" else (f"{path}-mask", self.config.window)
        return rope, shared, path

    def _shared(self, info: StageInfo, memo: dict) -> dict:
        """{memo key: value} of what this block reads, taken from ``memo`` or built."""
        rope, shared, path = self._keys(info)
        out = {}
        out[rope] = memo[rope] if rope in memo else rotary_tables(
            info.length, self.head_dim, self.config.rope_base, info.doc.device
        )
        out[shared] = memo[shared] if shared in memo else build_shared(info, self.config.window, path)
        return out

    def prepare(self, info: StageInfo, memo: dict) -> None:
        memo.update(self._shared(info, memo))

    def forward(self, x: torch.Tensor, info: StageInfo, memo: dict) -> torch.Tensor:
        rope, shared_key, path = self._keys(info)
        shared = self._shared(info, memo)
        q, k, v = rearrange(self.qkv(self.attn_norm(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        cos, sin = shared[rope]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self._finish(x, self._attend(q, k, v, shared[shared_key], path))

    def _attend(self, q, k, v, shared, path: str) -> torch.Tensor:
        """(B, H, L, D) attention outputs by ``path``, reading ``shared`` (a mask or document starts)."""
        if path == "flex":
            return flex_attention(q, k, v, shared)
        if path == "banded":
            return banded_attention(q, k, v, shared, self.config.window)
        return document_attention(q, k, v, shared)

    def _finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The residual of the attention outputs (B, H, L, D), then the feed-forward."""
        return self._mlp(x + self.out(rearrange(attended, "b h l d -> b l (h d)")))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.mlp_norm(x))

    def init_state(self, batch: int, max_len: int, device, dtype) -> KVCache:
        window = self.config.window
        slots = min(window, max_len) if window > 0 else max_len
        cos, sin = rotary_tables(max_len, self.head_dim, self.config.rope_base, device)
        shape = (batch, self.heads, slots, self.head_dim)
        return KVCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            pos=torch.full((batch, slots), -1, device=device, dtype=torch.long),
            cos=cos,
            sin=sin,
        )

    def step(self, x: torch.Tensor, state: KVCache, info: StepInfo) -> tuple[torch.Tensor, KVCache]:
        B, (_, H, slots, hd) = x.shape[0], state.k.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, 3, H, hd).unbind(1)
        cos, sin = state.cos[info.pos].unsqueeze(1), state.sin[info.pos].unsqueeze(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        slot = info.pos % slots
        if info.uniform:  # one slot for every row
            state.k.index_copy_(2, slot[:1], k.unsqueeze(2))
            state.v.index_copy_(2, slot[:1], v.unsqueeze(2))
            state.pos.index_copy_(1, slot[:1], info.pos[:, None])
        else:
            rows = info.write.nonzero().squeeze(1)
            state.k[rows, :, slot[rows]], state.v[rows, :, slot[rows]] = k[rows], v[rows]
            state.pos[rows, slot[rows]] = info.pos[rows]
        used = min(slots, info.length)
        mask = None  # uniform rows: the cache holds exactly the keys each query may see
        if not info.uniform:
            key_pos = state.pos[:, :used]
            ok = allowed_keys(info.pos[:, None], key_pos, 0, 0, self.config.window) & (key_pos >= 0)
            mask = (ok | ~info.write[:, None])[:, None, None, :]  # rows not advancing: any finite output
        keys, values = state.k[:, :, :used], state.v[:, :, :used]
        y = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask)
        x = x + self.out(y.reshape(B, -1))
        return self._mlp(x), state

    def prefill(self, x: torch.Tensor, state: KVCache, info: StageInfo) -> tuple[torch.Tensor, KVCache]:
        """The forward pass, then each row's newest keys into the cache: slot j holds the
        largest valid position p with p % slots == j."""
        B, L, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, state.cos[:L], state.sin[:L]), apply_rotary(k, state.cos[:L], state.sin[:L])
        if not 0 < self.config.window < L and one_document_per_row(info):  # causal is the whole mask
            y = self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))  # Flash on CUDA
        else:
            path = self.path(x.device, L)
            y = self._finish(x, self._attend(q, k, v, build_shared(info, self.config.window, path), path))
        slots = state.k.shape[2]
        last = info.valid.sum(1, keepdim=True) - 1  # (B, 1)
        j = torch.arange(slots, device=x.device)
        pos = j + slots * torch.div(last - j, slots, rounding_mode="floor")  # (B, slots)
        held = pos >= 0
        index = pos.clamp(min=0)[:, None, :, None].expand(-1, self.heads, -1, self.head_dim)
        empty = ~held[:, None, :, None]
        state.k.copy_(k.gather(2, index).masked_fill(empty, 0))
        state.v.copy_(v.gather(2, index).masked_fill(empty, 0))
        state.pos.copy_(torch.where(held, pos, -1))
        return y, state

    def forward_flops(self, length: int) -> float:
        inner = self.heads * self.head_dim
        projections = 2.0 * length * (self.dim * 3 * inner + inner * self.dim)
        attention = 4.0 * length * inner * mean_context(length, self.config.window)
        return projections + attention + self.mlp.forward_flops(length)


@attrs.define(eq=False)
class KVCache:
    """Keys and values of one block; position p sits in slot ``p % slots``."""

    k: torch.Tensor  # (B, heads, slots, head_dim), rotary applied
    v: torch.Tensor  # (B, heads, slots, head_dim)
    pos: torch.Tensor  # (B, slots) long: the stage position held in each slot, -1 if empty
    cos: torch.Tensor  # (max_len, head_dim / 2): rotary table by position
    sin: torch.Tensor


def one_document_per_row(info: StageInfo) -> bool:
    """Every row holds one document, padding only after it (checked on the host)."""
    first = info.doc[:, :1]
    prefix = info.valid.long().cumsum(1) == torch.arange(1, info.valid.shape[1] + 1, device=info.valid.device)
    return bool(((info.doc == first) | ~info.valid).all() and (prefix | ~info.valid).all())


def build_shared(info: StageInfo, window: int, path: str):
    """What ``path`` reads for a stage call: document starts, or the banded or block mask."""
    if path == "documents":
        return document_starts(info.doc)
    if path == "banded":
        return build_banded_mask(info, window)
    return flex_block_mask(info, window)
