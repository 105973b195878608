"""Negative log-likelihoods of target tokens (bytes, for byte-level models) from the full forward, in static-shape batches.

Documents are packed into one stream (``BOS doc0 BOS doc1 ...``, boundaries computed over each
whole document, as in training) and padded with PAD, so every window holds exactly
``seq_len`` tokens and every batch exactly ``batch_size`` rows. Window at start ``s`` reads
tokens ``s .. s+seq_len-1``; its column ``c`` predicts stream token ``s + c + 1``. Logits are
causal, so tokens after a scored position (the next document, padding) never change its score.
"""
from __future__ import annotations

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from unetlm.data.packing import TokenStream, pack
from unetlm.core.tokens import PAD


def padded_stream(documents: list[bytes | tuple[bytes, ...]], model) -> TokenStream:
    """The packed stream of ``documents`` (tokenized as ``model`` reads them) followed by ``seq_len + 1`` PAD tokens."""
    seq_len = model.spec.seq_len
    stream = pack(documents, model.splitters, model.tokenizer)
    n = seq_len + 1
    return TokenStream(
        np.concatenate([stream.tokens, np.full(n, PAD, dtype=stream.tokens.dtype)]),
        np.concatenate([stream.doc, np.full(n, stream.doc[-1] if len(stream) else 0, dtype=stream.doc.dtype)]),
        np.concatenate([stream.masks, np.zeros((stream.masks.shape[0], n), dtype=bool)], axis=1),
    )


@attrs.define
class WindowScores:
    nll: np.ndarray  # (windows, seq_len) float64 nats; 0 at PAD targets
    greedy: np.ndarray  # (windows, seq_len) bool: the target is the most likely token
    truncated: int  # boundaries dropped by a stage's max_len


@torch.no_grad()
def window_nll(model, stream: TokenStream, starts: np.ndarray, batch_size: int = 8) -> WindowScores:
    """Scores of the windows at ``starts``: per-target NLL, greedy flags and truncation.

    Rows are evaluated ``batch_size`` at a time; a short last batch is filled with copies of its
    first window (static shapes), whose results are dropped.
    """
    seq_len = model.spec.seq_len
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = WindowScores(np.zeros((len(starts), seq_len)), np.zeros((len(starts), seq_len), dtype=bool), 0)
    try:
        for i in range(0, len(starts), batch_size):
            chunk = np.asarray(starts[i : i + batch_size], dtype=np.int64)
            rows = len(chunk)
            chunk = np.concatenate([chunk, np.full(batch_size - rows, chunk[0], dtype=np.int64)])
            batch = stream.window_batch(chunk, seq_len).to(device)
            output = model(batch.tokens, batch.doc, batch.masks)
            logits = output.logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=PAD, reduction="none")
            out.nll[i : i + rows] = nll[:rows].double().cpu().numpy()
            out.greedy[i : i + rows] = (logits.argmax(-1) == batch.targets)[:rows].cpu().numpy()
            out.truncated += sum(int(t[:rows].sum()) for t in output.truncated)
    finally:
        model.train(was_training)
    return out
