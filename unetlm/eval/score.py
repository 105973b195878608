"""Negative log-likelihoods of target bytes from the full forward, in static-shape batches.

Documents are packed into one stream (``BOS doc0 BOS doc1 ...``, boundaries computed over each
whole document, as in training) and padded with PAD, so every window holds exactly
``seq_len`` tokens and every batch exactly ``batch_size`` rows. Window at start ``s`` reads
tokens ``s .. s+seq_len-1``; its column ``c`` predicts stream token ``s + c + 1``. Logits are
causal, so tokens after a scored position (the next document, padding) never change its score.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unetlm.data.packing import TokenStream, pack
from unetlm.model.tokens import PAD


def padded_stream(documents: list[bytes], splitters, seq_len: int) -> TokenStream:
    """The packed stream of ``documents`` followed by ``seq_len + 1`` PAD tokens."""
    stream = pack(documents, splitters)
    n = seq_len + 1
    return TokenStream(
        np.concatenate([stream.tokens, np.full(n, PAD, dtype=stream.tokens.dtype)]),
        np.concatenate([stream.doc, np.full(n, stream.doc[-1] if len(stream) else 0, dtype=stream.doc.dtype)]),
        np.concatenate([stream.masks, np.zeros((stream.masks.shape[0], n), dtype=bool)], axis=1),
    )


@torch.no_grad()
def window_nll(model, stream: TokenStream, starts: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, int]:
    """(len(starts), seq_len) NLL in nats (float64, 0 at PAD targets) and the boundaries truncated by max_len.

    Rows are evaluated ``batch_size`` at a time; a short last batch is filled with copies of its
    first window (static shapes), whose results are dropped.
    """
    seq_len = model.spec.seq_len
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = np.zeros((len(starts), seq_len), dtype=np.float64)
    truncated = 0
    try:
        for i in range(0, len(starts), batch_size):
            chunk = np.asarray(starts[i : i + batch_size], dtype=np.int64)
            rows = len(chunk)
            chunk = np.concatenate([chunk, np.full(batch_size - rows, chunk[0], dtype=np.int64)])
            batch = stream.window_batch(chunk, seq_len).to(device)
            output = model(batch.tokens, batch.doc, batch.masks)
            nll = F.cross_entropy(
                output.logits.float().transpose(1, 2), batch.targets, ignore_index=PAD, reduction="none"
            )
            out[i : i + rows] = nll[:rows].double().cpu().numpy()
            truncated += sum(int(t[:rows].sum()) for t in output.truncated)
    finally:
        model.train(was_training)
    return out, truncated
