"""Running the stage splitters over token rows, one document at a time.

Splitters see the bytes of one document only (a BOS token is a boundary at every stage and
is not shown to them), so packed documents never influence each other's boundaries. A document
too long to hold goes through :class:`ChainScan` in chunks, with the same masks.
"""
from __future__ import annotations

import numpy as np
import torch

from unetlm.core.tokens import BOS, PAD
from unetlm.splitters.base import Splitter


def split_document(splitters: list[Splitter], data: bytes) -> np.ndarray:
    """Nested byte-level masks (n_splitters, len(data)) for one document's bytes."""
    out = np.zeros((len(splitters), len(data)), dtype=bool)
    parent = np.ones(len(data), dtype=bool)
    for s, splitter in enumerate(splitters):
        parent = np.asarray(splitter.boundaries(data, parent), dtype=bool) & parent
        out[s] = parent
    return out


class ChainScan:
    """:func:`split_document` of one document fed in consecutive chunks: each splitter's scan
    (:meth:`~unetlm.splitters.base.Splitter.scan`) reads the previous one's marks as its parent."""

    def __init__(self, splitters: list[Splitter]) -> None:
        self.scans = [splitter.scan() for splitter in splitters]

    def feed(self, data: bytes) -> np.ndarray:
        """(n_splitters, len(data)) masks of the document's next bytes."""
        out = np.zeros((len(self.scans), len(data)), dtype=bool)
        parent = np.ones(len(data), dtype=bool)
        for s, scan in enumerate(self.scans):
            parent = np.asarray(scan.feed(data, parent), dtype=bool) & parent
            out[s] = parent
        return out


def split_row(splitters: list[Splitter], tokens: np.ndarray, doc: np.ndarray) -> np.ndarray:
    """(n_splitters, T) masks for one row of tokens with document ids."""
    T = len(tokens)
    out = np.zeros((len(splitters), T), dtype=bool)
    if not splitters or T == 0:
        return out
    change = np.flatnonzero(np.diff(doc)) + 1
    for a, b in zip(np.concatenate([[0], change]), np.concatenate([change, [T]])):
        while b > a and tokens[b - 1] == PAD:
            b -= 1
        if a >= b:
            continue
        if tokens[a] == BOS:
            out[:, a] = True
            a += 1
        out[:, a:b] = split_document(splitters, tokens[a:b].astype(np.uint8).tobytes())
    return out


def split_batch(splitters: list[Splitter], tokens: torch.Tensor, doc: torch.Tensor) -> list[torch.Tensor]:
    """List of (B, T) bool masks, one per splitter, on the tokens' device."""
    tok, dc = tokens.cpu().numpy(), doc.cpu().numpy()
    rows = np.stack([split_row(splitters, tok[i], dc[i]) for i in range(tok.shape[0])], axis=1)
    return [torch.from_numpy(rows[s]).to(tokens.device) for s in range(len(splitters))]
