"""Causal self-attention block: pre-RMSNorm, RoPE, SwiGLU MLP, optional sliding window.

Query i attends to keys j with j <= i, i - j < window (when window > 0) and the same
document. FlexAttention (block-sparse) serves compiled blocks on CUDA; elsewhere scaled-dot-product
attention with a dense boolean mask gives the same numbers. Off CUDA, ``backend = "flex"`` runs
eager FlexAttention only where it is right and can run: compiled FlexAttention on the CPU gives
wrong outputs with rotary q and k (torch 2.13, docs/architecture.md), and eager FlexAttention on
the CPU has no backward, so a compiled block or a call under autograd uses SDPA. Step by step, a KV cache holds
the keys (a ring buffer of exactly ``window`` slots for a sliding window) and the same
:func:`allowed_keys` rule picks the keys each query sees.
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
        """FlexAttention's backward runs on CUDA only: training elsewhere needs 'auto' or 'sdpa'."""
        if self.backend == "flex" and training and device_type != "cuda":
            raise RecipeError(
                f"{path}.backend = 'flex' is invalid on {device_type}: FlexAttention trains on CUDA only; "
                f"use 'auto' (flex on CUDA, sdpa elsewhere) or 'sdpa'"
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


def allowed_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc, k_doc, window: int) -> torch.Tensor:
    """The one definition of who may see whom, used by both backends (and by generation)."""
    ok = (k_pos <= q_pos) & (q_doc == k_doc)
    if window > 0:
        ok = ok & (q_pos - k_pos < window)
    return ok


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

    def _backend(self, device: torch.device) -> str:
        """"auto": FlexAttention for a block compiled on CUDA, SDPA otherwise (eager flex would
        materialise every score). "flex" off CUDA: eager FlexAttention without autograd only."""
        choice = self.config.backend
        if choice == "auto":
            return "flex" if device.type == "cuda" and self.compiled else "sdpa"
        if choice == "sdpa" or device.type == "cuda":
            return choice
        eager_inference = not (self.compiled or torch.compiler.is_compiling()) and not torch.is_grad_enabled()
        return "flex" if eager_inference else "sdpa"

    def _keys(self, info: StageInfo):
        """memo keys of this block's rotary table and mask (blocks of one shape share them)."""
        backend = self._backend(info.doc.device)
        rope = ("rotary", info.length, self.head_dim, self.config.rope_base)
        return rope, ("attention-mask", backend, self.config.window), backend

    def _shared(self, info: StageInfo, memo: dict) -> dict:
        """{memo key: value} of what this block reads, taken from ``memo`` or built."""
        rope, mask, backend = self._keys(info)
        out = {}
        out[rope] = memo[rope] if rope in memo else rotary_tables(
            info.length, self.head_dim, self.config.rope_base, info.doc.device
        )
        out[mask] = memo[mask] if mask in memo else build_mask(info, self.config.window, backend)
        return out

    def prepare(self, info: StageInfo, memo: dict) -> None:
        memo.update(self._shared(info, memo))

    def forward(self, x: torch.Tensor, info: StageInfo, memo: dict) -> torch.Tensor:
        L = x.shape[1]
        rope, mask_key, backend = self._keys(info)
        shared = self._shared(info, memo)
        (cos, sin), mask = shared[rope], shared[mask_key]
        q, k, v = rearrange(self.qkv(self.attn_norm(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if backend == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            y = flex_attention(q, k, v, block_mask=mask)
        elif is_banded(L, self.config.window):
            y = banded_attention(q, k, v, mask, self.config.window)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(rearrange(y, "b h l d -> b l (h d)"))
        return self._mlp(x)

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
        if self.config.window == 0 and one_document_per_row(info):  # causal is the whole mask: SDPA's fast path
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = self._mlp(x + self.out(attended.transpose(1, 2).reshape(B, L, -1)))
        else:
            y = self.forward(x, info, {})
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


def is_banded(length: int, window: int) -> bool:
    """Whether SDPA runs blockwise: a sliding window at most a third of the sequence (then the
    two blocks a query reads hold fewer keys than the causal average of the full matrix)."""
    return 0 < window and 3 * window <= length


def _blocks(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, n, window, D), zero-padded to n = ceil(L / window) blocks."""
    L = x.shape[2]
    n = -(-L // window)
    return rearrange(F.pad(x, (0, 0, 0, n * window - L)), "b h (n w) d -> b h n w d", w=window)


def _with_previous_block(x: torch.Tensor) -> torch.Tensor:
    """(B, H, n, W, D) -> (B, H, n, 2W, D): each block preceded by the block before it (zeros for the first)."""
    previous = F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1]
    return torch.cat([previous, x], dim=3)


def banded_attention(q, k, v, mask: torch.Tensor, window: int) -> torch.Tensor:
    """SDPA for a sliding window of W keys, block by block: the queries of block i read only the
    keys of blocks i - 1 and i (2W keys, not L), with ``mask`` from :func:`build_banded_mask`.
    Equal to full SDPA under the full mask, at a fraction of its work when L >> W."""
    L = q.shape[2]
    keys, values = _with_previous_block(_blocks(k, window)), _with_previous_block(_blocks(v, window))
    y = F.scaled_dot_product_attention(_blocks(q, window), keys, values, attn_mask=mask)
    return rearrange(y, "b h n w d -> b h (n w) d")[:, :, :L]


def build_banded_mask(info: StageInfo, window: int) -> torch.Tensor:
    """(B, 1, n, W, 2W) bool: query a of block i may see key b of blocks (i - 1, i) by :func:`allowed_keys`;
    the zero blocks before the first and after the last position belong to no document."""
    B, L = info.doc.shape
    n = -(-L // window)
    doc = F.pad(info.doc, (0, n * window - L), value=-2).view(B, n, window)  # -2: no document
    doc_keys = torch.cat([F.pad(doc, (0, 0, 1, 0), value=-2)[:, :-1], doc], dim=2)
    pos = torch.arange(n * window, device=info.doc.device).view(n, window)
    pos_keys = torch.cat([pos - window, pos], dim=1)
    ok = allowed_keys(pos[:, :, None], pos_keys[:, None, :], doc[..., :, None], doc_keys[..., None, :], window)
    return ok.unsqueeze(1)


def build_mask(info: StageInfo, window: int, backend: str):
    L = info.doc.shape[1]
    if backend == "sdpa" and is_banded(L, window):
        return build_banded_mask(info, window)
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        doc = info.doc

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed_keys(q_idx, kv_idx, doc[b, q_idx], doc[b, kv_idx], window)

        return create_block_mask(mask_mod, doc.shape[0], None, L, L, device=doc.device)
    pos = torch.arange(L, device=info.doc.device)
    ok = allowed_keys(pos[:, None], pos[None, :], info.doc[:, :, None], info.doc[:, None, :], window)
    return ok.unsqueeze(1)  # (B, 1, L, L)
