"""Negative log-likelihoods of target tokens (bytes, for byte-level models) from the full forward, in static-shape batches.

Documents are packed into one stream (``BOS doc0 BOS doc1 ...``, boundaries computed over each
whole document, as in training). A caller asks for spans ``(context, first, stop)``: score the
targets of stream inputs ``first .. stop - 1`` (input p predicts token p + 1), reading context
from ``context`` on. :func:`unetlm.data.rows.span_rows` turns the spans into rows in which no
byte-level stage overflows its ``max_len`` (a span that would overflow is scored over several
rows, each with as much context as fits); rows are padded with PAD to ``seq_len`` and batches
filled to ``batch_size`` rows. Logits are causal, so tokens after a scored position never change its score.
"""
from __future__ import annotations

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from unetlm.core.tokens import PAD
from unetlm.data.packing import TokenStream, pack
from unetlm.data.rows import span_rows, row_reach
from unetlm.data.windows import read_rows


def scoring_stream(documents: list[bytes | tuple[bytes, ...]], model) -> TokenStream:
    """The packed stream of ``documents``, tokenized and split as ``model`` reads them."""
    return pack(documents, model.splitters, model.tokenizer)


@attrs.define
class TargetScores:
    nll: np.ndarray  # (n,) float64 nats of the target of each stream input position; 0 where not scored
    greedy: np.ndarray  # (n,) bool: that target is the most likely token
    truncated: int  # boundaries dropped by a learned splitter's stage (byte-level stages never overflow)
    rows: int  # rows the model read


@torch.no_grad()
def score_spans(model, stream: TokenStream, spans: list[tuple[int, int, int]], batch_size: int = 8,
                progress=None) -> TargetScores:
    """Scores of the targets of every span ``(context, first, stop)`` of ``stream`` (see the module doc).

    A short last batch is filled with copies of its first row, whose results are dropped.
    ``progress(rows_done, rows)``, if given, is called after each batch.
    """
    seq_len = model.spec.seq_len
    limits = model.lengths[1 : 1 + len(model.splitters)]
    reach, _ = row_reach(stream.masks[: len(limits), : len(stream) - 1], limits, seq_len)  # the last token: a target
    rows = span_rows(reach, spans, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = TargetScores(np.zeros(len(stream)), np.zeros(len(stream), dtype=bool), 0, len(rows))
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            filled = chunk + [chunk[0]] * (batch_size - len(chunk))
            batch = read_rows([(stream, start, end) for start, end, _, _ in filled], seq_len).to(device)
            output = model(batch.tokens, batch.doc, batch.masks)
            logits = output.logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=PAD, reduction="none")
            nll, greedy = nll.double().cpu().numpy(), (logits.argmax(-1) == batch.targets).cpu().numpy()
            for r, (start, _, a, b) in enumerate(chunk):
                out.nll[a:b] = nll[r, a - start : b - start]
                out.greedy[a:b] = greedy[r, a - start : b - start]
            out.truncated += sum(int(t[: len(chunk)].sum()) for t in output.truncated)
            if progress is not None:
                progress(i + len(chunk), len(rows))
    finally:
        model.train(was_training)
    return out
