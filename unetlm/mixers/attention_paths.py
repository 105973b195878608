"""The exact paths of causal attention: none builds a dense L x L mask.

Every path computes, at every real position, softmax attention of query i over the keys
:func:`allowed_keys` admits (j <= i, the same document, and i - j < window when a window is set);
tensors are (B, H, L, D), ``doc`` (B, L) document ids with padding (``PAD_DOC``) after a row's
documents. Padding positions never reach a real one; their own outputs are finite but unspecified.

- :func:`document_attention`: full causal attention within each document, through the CPU's
  flash kernel (``is_causal``); a single call over the whole batch when every row holds one
  document (trailing padding included: its outputs are unspecified, real positions never see it). Cost: the sum over documents of their causal attention, never more than
  causal attention over the row. A custom op (opaque to ``torch.compile``), CPU only.
- :func:`banded_attention`: a sliding window of W keys, block by block: each block of W
  queries reads 2W keys. O(L·W) work and mask.
- :func:`flex_attention`: FlexAttention under a block mask (:func:`flex_block_mask`): windows
  and documents at once, masked blocks skipped; compiled, on CUDA.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from unetlm.core.layout import PAD_DOC, StageInfo

FLEX_BLOCK = 128  # FlexAttention's block size (torch's default), in positions


def allowed_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc, k_doc, window: int) -> torch.Tensor:
    """The one definition of who may see whom, used by every path (and by generation)."""
    ok = (k_pos <= q_pos) & (q_doc == k_doc)
    if window > 0:
        ok = ok & (q_pos - k_pos < window)
    return ok


# ---- full causal attention, one document at a time (CPU) ----

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def document_starts(doc: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True where a document begins after position 0. Padding (``PAD_DOC``, after a
    row's documents) continues the run before it: real positions never see it (it comes after
    them), its own outputs are unspecified, and a row's last document is computed over the same
    span whatever its length, so appending to it leaves earlier outputs bit for bit as they were."""
    return F.pad((doc[:, 1:] != doc[:, :-1]) & (doc[:, 1:] != PAD_DOC), (1, 0))


def _runs(starts: torch.Tensor) -> list[list[int]] | None:
    """Per row, the bounds [0, s1, ..., L] of its runs; None when no row has more than one."""
    B, L = starts.shape
    where = starts.nonzero().tolist()
    if not where:
        return None
    rows = [[0] for _ in range(B)]
    for b, pos in where:
        rows[b].append(pos)
    return [r + [L] for r in rows]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_like_heads(q: Tensor) -> Tensor:
    """A fresh (B, H, L, D) tensor laid out as (B, L, H, D), so merging the heads is a view."""
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).transpose(1, 2)


@torch.library.custom_op("unetlm::document_attention", mutates_args=(), device_types="cpu")
def _document_attention(q: Tensor, k: Tensor, v: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    out = _empty_like_heads(q)
    lse = q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))
    rows = _runs(starts)
    if rows is None:  # every row one document: causal attention over whole rows
        o, m = _flash(q, k, v, 0.0, True)
        out.copy_(o)
        lse.copy_(m)
        return out, lse
    for b, bounds in enumerate(rows):
        for s, e in zip(bounds, bounds[1:]):
            part = (slice(b, b + 1), slice(None), slice(s, e))
            o, m = _flash(q[part], k[part], v[part], 0.0, True)
            out[part] = o
            lse[part] = m
    return out, lse


@_document_attention.register_fake
def _(q, k, v, starts):
    return _empty_like_heads(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("unetlm::document_attention_backward", mutates_args=(), device_types="cpu")
def _document_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, starts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    grads = [_empty_like_heads(t) for t in (q, k, v)]
    rows = _runs(starts)
    if rows is None:
        for g, d in zip(grads, _flash_backward(grad, q, k, v, out, lse, 0.0, True)):
            g.copy_(d)
        return tuple(grads)
    for b, bounds in enumerate(rows):
        for s, e in zip(bounds, bounds[1:]):
            part = (slice(b, b + 1), slice(None), slice(s, e))
            parts = _flash_backward(grad[part], q[part], k[part], v[part], out[part], lse[part], 0.0, True)
            for g, d in zip(grads, parts):
                g[part] = d
    return tuple(grads)


@_document_attention_backward.register_fake
def _(grad, q, k, v, out, lse, starts):
    return tuple(_empty_like_heads(t) for t in (q, k, v))


def _save(ctx, inputs, output) -> None:
    q, k, v, starts = inputs
    ctx.save_for_backward(q, k, v, *output, starts)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, starts = ctx.saved_tensors
    dq, dk, dv = _document_attention_backward(grad_out, q, k, v, out, lse, starts)
    return dq, dk, dv, None


_document_attention.register_autograd(_backward, setup_context=_save)


def document_attention(q: Tensor, k: Tensor, v: Tensor, starts: Tensor) -> Tensor:
    """Causal attention within each document: ``starts`` from :func:`document_starts`. The
    output (B, H, L, D) is laid out as (B, L, H, D)."""
    return _document_attention(q, k, v, starts)[0]


# ---- sliding windows, block by block ----


def band_block(window: int, length: int) -> int:
    """Positions per block of :func:`banded_attention`: the window, or the whole stage when shorter."""
    return min(window, length)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, n, block, D), zero-padded to n = ceil(L / block) blocks."""
    L = x.shape[2]
    n = -(-L // block)
    return rearrange(F.pad(x, (0, 0, 0, n * block - L)), "b h (n w) d -> b h n w d", w=block)


def _with_previous_block(x: torch.Tensor) -> torch.Tensor:
    """(B, H, n, P, D) -> (B, H, n, 2P, D): each block preceded by the block before it (zeros for the first)."""
    previous = F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1]
    return torch.cat([previous, x], dim=3)


def banded_attention(q, k, v, mask: torch.Tensor, window: int) -> torch.Tensor:
    """SDPA for a sliding window of W keys, block by block (blocks of :func:`band_block`
    positions): the queries of block i read only the keys of blocks i - 1 and i (2W keys, not L),
    with ``mask`` from :func:`build_banded_mask`."""
    L = q.shape[2]
    block = band_block(window, L)
    keys, values = _with_previous_block(_blocks(k, block)), _with_previous_block(_blocks(v, block))
    y = F.scaled_dot_product_attention(_blocks(q, block), keys, values, attn_mask=mask)
    return rearrange(y, "b h n w d -> b h (n w) d")[:, :, :L]


def build_banded_mask(info: StageInfo, window: int) -> torch.Tensor:
    """(B, 1, n, P, 2P) bool, P = :func:`band_block`: query a of block i may see key b of blocks
    (i - 1, i) by :func:`allowed_keys`; the zero blocks before the first and after the last
    position belong to no document."""
    B, L = info.doc.shape
    block = band_block(window, L)
    n = -(-L // block)
    doc = F.pad(info.doc, (0, n * block - L), value=-2).view(B, n, block)  # -2: no document
    doc_keys = torch.cat([F.pad(doc, (0, 0, 1, 0), value=-2)[:, :-1], doc], dim=2)
    pos = torch.arange(n * block, device=info.doc.device).view(n, block)
    pos_keys = torch.cat([pos - block, pos], dim=1)
    ok = allowed_keys(pos[:, :, None], pos_keys[:, None, :], doc[..., :, None], doc_keys[..., None, :], window)
    return ok.unsqueeze(1)


# ---- FlexAttention ----


@functools.cache
def compiled(fn):
    """``fn`` compiled once per process (shapes become dynamic after the first change, so one
    graph serves every stage length)."""
    return torch.compile(fn)


def _mask_mod(doc: torch.Tensor, window: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return allowed_keys(q_idx, kv_idx, doc[b, q_idx], doc[b, kv_idx], window)

    return mask_mod


def flex_block_mask(info: StageInfo, window: int, build=None):
    """FlexAttention's block mask of ``info`` under :func:`allowed_keys`, made by ``build``
    (default on CUDA: torch's ``create_block_mask`` compiled, or traced into the caller's compiled
    region, which never materialises the L x L mask; elsewhere, where FlexAttention serves eager
    inference only, it runs eagerly)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if build is None:
        eager = torch.compiler.is_compiling() or info.doc.device.type != "cuda"
        build = create_block_mask if eager else compiled(create_block_mask)
    B, L = info.doc.shape
    return build(_mask_mod(info.doc, window), B, None, L, L, device=info.doc.device)


def block_mask_bytes(rows: int, length: int) -> int:
    """Bytes of one block mask over ``rows`` x ``length`` positions: partial and full block counts
    and indices, for the forward and (transposed) the backward, int32."""
    n = -(-length // FLEX_BLOCK)
    return 4 * rows * 4 * (n + n * n)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask) -> Tensor:
    """FlexAttention of q, k, v under ``block_mask``; compiled on CUDA. q, k and v are made
    contiguous: compiled FlexAttention (torch 2.13, CPU) reads a value tensor laid out unlike
    the queries and keys wrongly."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        flex = compiled(flex)
    return flex(q, k, v, block_mask=block_mask)
