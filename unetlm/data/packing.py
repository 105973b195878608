"""Packing documents into one token stream with document ids and stage boundaries.

The stream is ``BOS doc0 BOS doc1 ...``: bytes, or a tokenizer's ids. Boundaries are computed
once per whole document (so a row that starts mid-document still carries the right
boundaries); :mod:`unetlm.data.windows` cuts it into rows. The last ``valid_fraction`` of the
stream's bytes (a BOS counts as one) is held out for validation, so byte and tokenized models
hold out the same text.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import attrs
import numpy as np
import torch

from unetlm.splitters.splitting import split_document
from unetlm.core.tokens import BOS, BYTES
from unetlm.splitters.base import Splitter


@attrs.define
class Batch:
    tokens: torch.Tensor  # (B, T) long
    doc: torch.Tensor  # (B, T) long
    masks: list[torch.Tensor]  # per stage after the first: (B, T) bool
    targets: torch.Tensor  # (B, T) long

    def split(self, rows: int) -> list["Batch"]:
        """Consecutive blocks of ``rows`` rows (0: the whole batch as one block)."""
        n = self.tokens.shape[0]
        rows = rows or n
        pick = lambda t, a: t[a : a + rows]  # noqa: E731
        return [
            Batch(pick(self.tokens, a), pick(self.doc, a), [pick(m, a) for m in self.masks], pick(self.targets, a))
            for a in range(0, n, rows)
        ]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """On ``device``; ``non_blocking``: copied from pinned memory, without waiting for the device."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if non_blocking else t.to(device)

        return Batch(move(self.tokens), move(self.doc), [move(m) for m in self.masks], move(self.targets))


@attrs.define
class TokenStream:
    tokens: np.ndarray  # (N,) int32
    doc: np.ndarray  # (N,) int32
    masks: np.ndarray  # (S-1, N) bool

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, start: int, stop: int) -> "TokenStream":
        return TokenStream(self.tokens[start:stop], self.doc[start:stop], self.masks[:, start:stop])

    def read(self, start: int, stop: int) -> "TokenStream":
        """Positions ``start .. stop - 1`` (what a prepared corpus's ``read`` gives)."""
        return self.slice(start, stop)


def pack(documents: list[bytes | tuple[bytes, ...]], splitters: list[Splitter], tokenizer=BYTES) -> TokenStream:
    """One stream of ``documents``. A document given as a tuple of pieces is tokenized piece by
    piece (no token straddles two pieces, e.g. a context and its continuation)."""
    pieces = [d if isinstance(d, tuple) else (d,) for d in documents]
    ids = [np.concatenate([tokenizer.encode(p) for p in parts]) if parts else np.zeros(0, np.int64) for parts in pieces]
    n = sum(len(x) + 1 for x in ids)
    tokens = np.empty(n, dtype=np.int32)
    doc = np.empty(n, dtype=np.int32)
    masks = np.zeros((len(splitters), n), dtype=bool)
    pos = 0
    for i, (parts, x) in enumerate(zip(pieces, ids)):
        end = pos + len(x) + 1
        tokens[pos] = BOS
        tokens[pos + 1 : end] = x
        doc[pos:end] = i
        masks[:, pos] = True
        if splitters:  # byte-level models only: a token is a byte
            masks[:, pos + 1 : end] = split_document(splitters, b"".join(parts))
        pos = end
    return TokenStream(tokens, doc, masks)


def training_cut(total_bytes: int, valid_fraction: float) -> int:
    """Stream bytes (a BOS counts as one) before the held-out part."""
    return int(total_bytes * (1.0 - valid_fraction))


def split_text(documents: list[bytes], n_bytes: int) -> tuple[list[bytes], list[bytes]]:
    """The documents' bytes before and from byte ``n_bytes`` of their stream (a BOS counts as
    one); a document cut in two has its head in the first list and its tail in the second."""
    before, after, pos = [], [], 0
    for data in documents:
        cut = n_bytes - pos - 1  # this document's bytes before the cut (its BOS is stream byte pos)
        if cut > 0:
            before.append(data[:cut])
        if cut < len(data):
            after.append(data[max(cut, 0) :])
        pos += len(data) + 1
    return before, after


def text_prefix(documents: list[bytes], n_bytes: int) -> list[bytes]:
    """The documents cut after ``n_bytes`` bytes of their stream (a BOS counts as one)."""
    return split_text(documents, n_bytes)[0]


def training_text(documents: list[bytes], valid_fraction: float) -> list[bytes]:
    """The documents' bytes before the held-out part (what a tokenizer may learn from)."""
    return split_text(documents, training_cut(sum(len(d) + 1 for d in documents), valid_fraction))[0]


def tokenizer_training_text(documents: Iterable[bytes], valid_fraction: float, train_bytes: int = 0) -> list[bytes]:
    """``training_text(documents, valid_fraction)``, cut to its first ``train_bytes`` bytes (0: all),
    reading only as many documents as that needs: once the stream holds ``train_bytes / (1 -
    valid_fraction) + 1`` bytes, the held-out cut of any longer stream lies beyond ``train_bytes``."""
    if not train_bytes or valid_fraction >= 1.0:
        text = training_text(list(documents), valid_fraction)
        return text_prefix(text, train_bytes) if train_bytes else text
    enough = math.ceil(train_bytes / (1.0 - valid_fraction)) + 1
    read, total = [], 0
    for data in documents:
        read.append(data)
        total += len(data) + 1
        if total >= enough:
            return text_prefix(read, train_bytes)
    return text_prefix(training_text(read, valid_fraction), train_bytes)


def held_out_text(documents: list[bytes], valid_fraction: float) -> list[bytes]:
    """The documents' bytes from the held-out part on (what no run trains on)."""
    return split_text(documents, training_cut(sum(len(d) + 1 for d in documents), valid_fraction))[1]


def shard_rows(rows, rank: int, world: int):
    """Rank ``rank``'s equal block of a global batch's rows (an array or a list)."""
    if len(rows) % world:
        raise ValueError(f"a batch of {len(rows)} sequences does not split over {world} processes")
    per = len(rows) // world
    return rows[rank * per : (rank + 1) * per]
