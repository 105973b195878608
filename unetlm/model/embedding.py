"""Byte embedding: one learned vector per token (256 bytes + specials), plus optional hashed
n-gram embeddings (BLT): for each configured n, a table row picked by a fixed polynomial hash
of the n tokens ending at the position, summed onto the token vector.

Position t reads tokens t-n+1..t of its own document only (earlier slots, other documents and
padding hash as "absent"), so the embedding is causal and packed documents stay independent.
"""
from __future__ import annotations

import torch
from torch import nn

from unetlm.core.tokens import PAD, VOCAB
from unetlm.recipe.schema import EmbeddingSpec

HASH_MOD = 2_147_483_647  # a prime below 2**31: every product below stays inside int64
HASH_BASE = 1_000_003


def ngram_hashes(tokens: torch.Tensor, doc: torch.Tensor, sizes: list[int], buckets: int) -> list[torch.Tensor]:
    """For each n in ``sizes``, (B, T) bucket ids of the n-gram ending at each position.

    hash_n(t) = sum_{k<n} v(t-k) * BASE**k mod MOD, where v is token + 1 inside the document
    and 0 outside it; the bucket is hash mod ``buckets``. Longer n-grams extend shorter ones.
    """
    B, T = tokens.shape
    out: dict[int, torch.Tensor] = {}
    value = tokens + 1
    total = value % HASH_MOD
    power = 1
    for k in range(1, max(sizes)):
        power = power * HASH_BASE % HASH_MOD
        if k < T:
            prev_tok, prev_doc = tokens[:, :-k], doc[:, :-k]
            inside = (prev_doc == doc[:, k:]) & (prev_tok != PAD)
            shifted = torch.where(inside, prev_tok + 1, 0)
            total = torch.cat([total[:, :k], (total[:, k:] + shifted * power) % HASH_MOD], dim=1)
        if k + 1 in sizes:
            out[k + 1] = total % buckets
    return [out[n] for n in sizes]


class ByteEmbedding(nn.Module):
    """tokens (B, T), doc (B, T) -> (B, T, dim)."""

    def __init__(self, dim: int, spec: EmbeddingSpec | None = None, vocab_size: int = VOCAB) -> None:
        super().__init__()
        self.spec = spec or EmbeddingSpec()
        self.table = nn.Embedding(vocab_size, dim)
        self.hashed = nn.ModuleList(nn.Embedding(self.spec.hash_buckets, dim) for _ in self.spec.hash_ngrams)

    def forward(self, tokens: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
        h = self.table(tokens)
        if self.spec.hash_ngrams:
            ids = ngram_hashes(tokens, doc, self.spec.hash_ngrams, self.spec.hash_buckets)
            for table, index in zip(self.hashed, ids):
                h = h + table(index)
        return h
