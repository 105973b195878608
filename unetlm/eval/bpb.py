"""Bits per byte of a model on whole files, one row per file.

A file is one document: ``BOS`` then its bytes (or its tokens, for a tokenized model, whose
NLL per token is summed and divided by the file's bytes). Every byte is scored exactly once; the end of
the document (predicting BOS after the last byte) is not scored. The first window of
``seq_len`` tokens scores the bytes it holds; each following window scores the next ``stride``
bytes and reads the ``seq_len - stride`` tokens before them as context (the last window ends
at the file's end, so it reads at least that much). ``stride == seq_len`` gives disjoint
windows; smaller strides cost ``seq_len / stride`` times more and give every scored byte more
context.
"""
from __future__ import annotations

import math
from pathlib import Path

import attrs
import numpy as np

from unetlm.eval.bootstrap import bootstrap_ci
from unetlm.eval.score import score_spans, scoring_stream

LN2 = math.log(2.0)


def window_plan(n_bytes: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored column) per window; column c of the window at s scores byte s + c."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"the stride must be between 1 and seq_len = {seq_len} (got {stride})")
    plan = [(0, 0)]
    end = min(seq_len, n_bytes)  # bytes 0 .. end-1 are scored
    while end < n_bytes:
        start = min(end + stride, n_bytes) - seq_len
        plan.append((start, end - start))
        end = min(end + stride, n_bytes)
    return plan


@attrs.define
class BpbRow:
    name: str
    bytes: int
    bits_per_byte: float
    ci: tuple[float, float]
    windows: int
    truncated: int  # coarse boundaries dropped by a stage's max_len (nonzero: raise max_len)

    def to_dict(self) -> dict:
        return attrs.asdict(self, recurse=False) | {"ci": list(self.ci)}


def token_nll(
    model, documents: list[bytes], stride: int, batch_size: int = 8, progress=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-token NLL in nats of the documents as the model reads them (bytes, or a tokenizer's
    tokens), concatenated; the window each token was scored in (numbered across documents); the
    bytes each token stands for; and the boundaries truncated by max_len. ``progress``: see
    :func:`~unetlm.eval.score.score_spans`."""
    seq_len = model.spec.seq_len
    tokens = [model.tokenizer.encode(d) for d in documents]
    spans, window, offsets, offset, w = [], [], [], 0, 0
    for ids in tokens:  # doc token k is the target of stream input offset + k
        doc_window = np.zeros(len(ids), dtype=np.int64)
        for start, first in window_plan(len(ids), seq_len, stride) if len(ids) else []:
            stop = min(start + seq_len, len(ids))
            spans.append((offset + start, offset + start + first, offset + stop))
            doc_window[start + first : stop] = w
            w += 1
        window.append(doc_window)
        offsets.append(offset)
        offset += len(ids) + 1
    scores = score_spans(model, scoring_stream(list(documents), model), spans, batch_size, progress)
    out = [scores.nll[o : o + len(ids)] for o, ids in zip(offsets, tokens)]
    ids = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return cat(out, np.float64), cat(window, np.int64), model.tokenizer.lengths[ids], scores.truncated


def file_bpb(
    model, path: str | Path, stride: int | None = None, batch_size: int = 8, resamples: int = 1000, seed: int = 0
) -> BpbRow:
    """Bits per byte of one file (default stride: ``seq_len // 2``), with a 95% CI over windows."""
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: the file is empty")
    return text_bpb(model, str(path), [data], stride, batch_size, resamples, seed)


def text_bpb(
    model,
    name: str,
    documents: list[bytes],
    stride: int | None = None,
    batch_size: int = 8,
    resamples: int = 1000,
    seed: int = 0,
) -> BpbRow:
    """Bits per byte of ``documents`` (each read on its own from BOS), with a 95% CI over windows."""
    stride = stride or max(1, model.spec.seq_len // 2)
    nll, window, lengths, truncated = token_nll(model, documents, stride, batch_size)
    n_bytes = sum(len(d) for d in documents)
    if not n_bytes:
        raise ValueError(f"{name}: nothing to score (no bytes)")
    per_window = np.bincount(window, weights=nll)
    counts = np.bincount(window, weights=lengths).astype(np.float64)
    low, high = bootstrap_ci(per_window / LN2, counts, resamples=resamples, seed=seed)
    return BpbRow(name, n_bytes, float(nll.sum() / n_bytes / LN2), (low, high), len(counts), truncated)


@attrs.define
class BlockScores:
    """Bits per byte of a text with its bits and bytes per block of ``block_bytes`` text bytes.

    Blocks cut the text's bytes (documents concatenated), not a model's windows or tokens, so two
    models scored on the same text have the same blocks: the units of a paired bootstrap. A token
    counts in the block of its last byte.
    """

    bits_per_byte: float
    ci: tuple[float, float]  # 95%, resampling blocks
    bytes: int
    truncated: int
    bits: np.ndarray  # (blocks,)
    block_bytes: np.ndarray  # (blocks,) bytes of the tokens counted in each block


def block_scores(
    model, documents: list[bytes], block_bytes: int = 512, stride: int | None = None, batch_size: int = 8,
    resamples: int = 1000, seed: int = 0, progress=None,
) -> BlockScores:
    """Bits per byte of ``documents`` (each read on its own from BOS) with blocks of ``block_bytes``
    for the bootstrap (see :class:`BlockScores`); ``progress`` as in :func:`token_nll`."""
    stride = stride or max(1, model.spec.seq_len // 2)
    nll, _, lengths, truncated = token_nll(model, documents, stride, batch_size, progress)
    n_bytes = int(lengths.sum())
    if not n_bytes:
        raise ValueError("nothing to score (no bytes)")
    block = (np.cumsum(lengths) - 1) // block_bytes
    count = int(block[-1]) + 1
    bits = np.bincount(block, weights=nll / LN2, minlength=count)
    sizes = np.bincount(block, weights=lengths, minlength=count)
    ci = bootstrap_ci(bits, sizes, resamples=resamples, seed=seed)
    return BlockScores(float(bits.sum() / n_bytes), ci, n_bytes, truncated, bits, sizes)
