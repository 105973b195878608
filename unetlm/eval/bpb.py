"""Bits per byte of a model on whole files, one row per file.

A file is one document: ``BOS`` then its bytes. Every byte is scored exactly once; the end of
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
from unetlm.eval.score import padded_stream, window_nll

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


def byte_nll(model, data: bytes, stride: int, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-byte NLL in nats (len(data),), the window each byte was scored in, and truncated boundaries."""
    seq_len = model.spec.seq_len
    plan = window_plan(len(data), seq_len, stride)
    stream = padded_stream([data], model.splitters, seq_len)
    nll, truncated = window_nll(model, stream, np.array([s for s, _ in plan]), batch_size)
    out = np.zeros(len(data), dtype=np.float64)
    window = np.zeros(len(data), dtype=np.int64)
    for w, (start, first) in enumerate(plan):
        stop = min(start + seq_len, len(data))
        out[start + first : stop] = nll[w, first : stop - start]
        window[start + first : stop] = w
    return out, window, truncated


def file_bpb(
    model, path: str | Path, stride: int | None = None, batch_size: int = 8, resamples: int = 1000, seed: int = 0
) -> BpbRow:
    """Bits per byte of one file (default stride: ``seq_len // 2``), with a 95% CI over windows."""
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path}: the file is empty")
    stride = stride or max(1, model.spec.seq_len // 2)
    nll, window, truncated = byte_nll(model, data, stride, batch_size)
    per_window = np.bincount(window, weights=nll)
    counts = np.bincount(window).astype(np.float64)
    low, high = bootstrap_ci(per_window / LN2, counts, resamples=resamples, seed=seed)
    return BpbRow(str(path), len(data), float(nll.sum() / len(data) / LN2), (low, high), len(counts), truncated)
