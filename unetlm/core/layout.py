"""Static-shape bookkeeping of which byte every stage position stands for.

Everything here is tensor arithmetic (cumsum, scatter, gather) with shapes fixed by the
per-stage maximum lengths: no host synchronisation, so it traces under ``torch.compile``.
"""
from __future__ import annotations

import attrs
import torch

PAD_DOC = -1  # document id of padding positions: they only ever see each other


@attrs.define  # not frozen: torch.compile cannot trace the __init__ of frozen attrs classes
class StageInfo:
    """Positions of one stage, each tensor (B, L_s)."""

    byte_pos: torch.Tensor  # long: the byte each position stands for (its boundary byte)
    valid: torch.Tensor  # bool: False for padding
    doc: torch.Tensor  # long: document id, PAD_DOC for padding
    # what the mixers of this stage build once per batch and share (masks, rotary tables), filled
    # by the first stack run on it (Stack.forward) so the encoder and the decoder share it
    shared: dict | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def length(self) -> int:
        return self.byte_pos.shape[1]


@attrs.define  # not frozen: torch.compile cannot trace the __init__ of frozen attrs classes
class Link:
    """How a fine stage (B, Lf) and the next coarser stage (B, Lc) relate.

    ``coarse_src[k]`` is the fine index of coarse vector k's boundary: pooling may read fine
    positions <= it. ``fine_seg[j]`` is 1 + the index of the newest coarse vector fine
    position j may see (boundary <= j, same document), or 0 for the learned start vector.
    ``fine_offset[j]`` counts fine steps since that boundary, or where ``fine_seg`` is 0 since
    the first position of j's document in the row: never across another document.
    """

    fine: StageInfo
    coarse: StageInfo
    fine_is_boundary: torch.Tensor  # (B, Lf) bool
    coarse_src: torch.Tensor  # (B, Lc) long
    fine_seg: torch.Tensor  # (B, Lf) long in [0, Lc]
    fine_offset: torch.Tensor  # (B, Lf) long: fine steps since that boundary (0: since the document's start)
    truncated: torch.Tensor  # (B,) long: boundaries dropped because Lc was too small


def byte_stage(doc: torch.Tensor, valid: torch.Tensor) -> StageInfo:
    B, T = doc.shape
    pos = torch.arange(T, device=doc.device).expand(B, T)
    return StageInfo(pos, valid, torch.where(valid, doc, PAD_DOC))


def document_start(doc: torch.Tensor) -> torch.Tensor:
    """(B, L) long: the index of the first position of each position's document in its row
    (documents are contiguous runs of equal ``doc``)."""
    index = torch.arange(doc.shape[1], device=doc.device).expand_as(doc)
    starts = torch.cat([torch.ones_like(doc[:, :1], dtype=torch.bool), doc[:, 1:] != doc[:, :-1]], dim=1)
    return torch.where(starts, index, 0).cummax(1).values


def link(fine: StageInfo, byte_mask: torch.Tensor, coarse_len: int) -> Link:
    """Build the coarse stage from a byte-level boundary mask (B, T) nested in the fine stage."""
    return link_from_fine(fine, byte_mask.gather(1, fine.byte_pos), coarse_len)


def link_from_fine(fine: StageInfo, fine_mask: torch.Tensor, coarse_len: int) -> Link:
    """Build the coarse stage from a boundary mask over the fine stage's positions (B, Lf)
    (a learned splitter's decisions); padding positions are never boundaries."""
    B, Lf = fine.byte_pos.shape
    is_b = fine_mask & fine.valid
    rank = is_b.long().cumsum(1)  # boundaries at or before each fine position
    total = rank[:, -1]
    slot = torch.where(is_b & (rank <= coarse_len), rank - 1, coarse_len)
    fine_index = torch.arange(Lf, device=is_b.device).expand(B, Lf)
    src = torch.zeros(B, coarse_len + 1, dtype=torch.long, device=is_b.device)
    src = src.scatter(1, slot, fine_index)[:, :coarse_len]
    coarse_valid = torch.arange(coarse_len, device=is_b.device)[None, :] < total[:, None]
    coarse = StageInfo(
        byte_pos=fine.byte_pos.gather(1, src),
        valid=coarse_valid,
        doc=torch.where(coarse_valid, fine.doc.gather(1, src), PAD_DOC),
    )
    seg = rank.clamp(max=coarse_len)
    newest = (seg - 1).clamp(min=0)
    same_doc = coarse.doc.gather(1, newest) == fine.doc
    seg = torch.where((seg > 0) & same_doc, seg, 0)
    offset = fine_index - torch.where(seg > 0, src.gather(1, newest), document_start(fine.doc))
    return Link(
        fine=fine,
        coarse=coarse,
        fine_is_boundary=is_b,
        coarse_src=src,
        fine_seg=seg,
        fine_offset=offset,
        truncated=(total - coarse_len).clamp(min=0),
    )


def build_links(doc: torch.Tensor, valid: torch.Tensor, masks: list[torch.Tensor], lengths: list[int]) -> list[Link]:
    """One :class:`Link` per stage transition; ``masks[i]`` marks stage i+1 boundaries in bytes."""
    links = []
    info = byte_stage(doc, valid)
    for mask, length in zip(masks, lengths):
        lk = link(info, mask, length)
        links.append(lk)
        info = lk.coarse
    return links
