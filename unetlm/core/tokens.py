"""Token ids shared by every model: ids 0-255 are the byte values, then two specials.

A byte-level model reads exactly these 258 ids (:data:`BYTES`). A tokenizer
(:mod:`unetlm.data.bpe`) keeps them and adds its merged tokens from id 258 up, so BOS, PAD and
the single bytes mean the same thing in every model.
"""
from __future__ import annotations

import functools

BOS = 256  # starts every document; predicting it means "the document ends here"
PAD = 257  # fills sequences; never a target
VOCAB = 258  # ids of a byte-level model


class ByteTokenizer:
    """The identity tokenizer of byte-level models: each byte is its own token."""

    name = "bytes"
    vocab_size = VOCAB
    bytes_per_token = 1.0

    @functools.cached_property
    def lengths(self):
        """(VOCAB,) int64: the bytes each id stands for (BOS, the document's end: 1; PAD: 0)."""
        import numpy as np  # imported on use: recipes and the CLI's listing stay free of numpy and torch

        lengths = np.ones(VOCAB, dtype=np.int64)
        lengths[PAD] = 0
        return lengths

    def encode(self, data: bytes):
        """(len(data),) int64 ids, no BOS."""
        import numpy as np

        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64)

    def piece(self, token: int) -> bytes:
        """The bytes of one id (BOS and PAD: none)."""
        return bytes([token]) if 0 <= token < 256 else b""

    def decode(self, ids) -> bytes:
        return b"".join(self.piece(int(t)) for t in ids)


BYTES = ByteTokenizer()


def encode(data: bytes, bos: bool = True):
    """A (len(data) + 1,) long tensor: BOS then the bytes (``bos=False``: the bytes only)."""
    import torch

    ids = torch.from_numpy(BYTES.encode(data))
    return torch.cat([torch.tensor([BOS]), ids]) if bos else ids


def documents_from_tokens(tokens):
    """Document ids (B, T) for a batch where each BOS starts a new document."""
    return (tokens == BOS).long().cumsum(1)
