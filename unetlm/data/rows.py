"""Rows: cut a token stream into rows in which no coarse stage overflows its ``max_len``.

A row is a run of consecutive stream positions ``[start, end)`` read as model inputs (its targets
are positions ``start + 1 .. end``), at most ``seq_len`` long. Stage ``s + 1`` of a row holds one
slot per boundary of ``masks[s]`` inside the row: a BOS is a boundary at every stage and takes a
slot; a row's first position takes one only when it is a boundary. (The masks are nested, as
:func:`unetlm.splitters.splitting.split_document` makes them, so a stage that fits holds exactly
its boundaries and the next stage counts its own mask.) Rows are greedy: each is as long as
``seq_len`` and every stage's ``limits[s]`` allow, and the next row continues the stream at the
position where it stopped, so a row ending early is padded and nothing is dropped or read twice.

The boundaries a learned splitter decides inside the forward are not known from the data: only
the byte-level masks are passed here, and those stages keep their ``max_len``.
Everything is vectorised numpy over chunks: a row's reach is a gather from each stage's boundary
positions, and the greedy walk takes runs of full rows at once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import numpy as np

FULL = -1  # the ``cause`` of a row cut by seq_len or the end of the stream, not by a stage

# positions cut into rows per chunk: a chunk's masks and boundary positions stay a few tens of MB
CHUNK = 1 << 22


class Reach:
    """How far rows may reach in a stretch of positions ``0 .. n - 1`` with masks (S, n)."""

    def __init__(self, masks: np.ndarray, limits: Sequence[int], seq_len: int) -> None:
        self.n, self.seq_len, self.limits = masks.shape[1], seq_len, list(limits)
        self.bounds = [np.flatnonzero(masks[s]) for s in range(len(self.limits))]

    def at(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(reach, cause) of rows starting at ``starts``: a row may end at ``reach`` (exclusive,
        ``<= n``) and no later; ``cause``: the transition whose limit cut it there, or :data:`FULL`."""
        reach = np.minimum(starts + self.seq_len, self.n)
        cause = np.full(len(starts), FULL, dtype=np.int8)
        for s, (bounds, limit) in enumerate(zip(self.bounds, self.limits)):
            # the row holds the first ``limit`` boundaries at or after its start; the next one ends it
            k = np.searchsorted(bounds, starts) + limit
            ends = np.where(k < len(bounds), bounds[np.minimum(k, len(bounds) - 1)] if len(bounds) else 0, self.n)
            cut = ends < reach
            reach = np.where(cut, ends, reach)
            cause = np.where(cut, np.int8(s), cause)
        return reach, cause


def row_reach(masks: np.ndarray, limits: Sequence[int], seq_len: int):
    """(reach, cause) of a row starting at each of the ``n`` positions of ``masks`` (S, n)."""
    return Reach(masks, limits, seq_len).at(np.arange(masks.shape[1], dtype=np.int64))


def walk(reach: Reach, first: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(starts, ends, causes) of the greedy rows from ``first`` that start before ``stop``, and
    the first start at or after ``stop``. Full rows are taken in growing runs, short ones one by one."""
    L = reach.seq_len
    starts, ends, causes, p, run = [], [], [], first, 1
    while p < stop:
        grid = p + L * np.arange(min(run, -(-(stop - p) // L)), dtype=np.int64)
        r, c = reach.at(grid)
        short = np.flatnonzero(r != grid + L)
        n = int(short[0]) + 1 if len(short) else len(grid)  # up to and including the first short row
        starts.append(grid[:n])
        ends.append(r[:n])
        causes.append(c[:n])
        p = int(r[n - 1])
        run = 1 if len(short) else min(2 * run, 4096)
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return cat(starts, np.int64), cat(ends, np.int64), cat(causes, np.int8), p


@attrs.define
class Rows:
    """Rows ``[starts[i], ends[i])`` covering stream positions ``[first, stop)`` without gaps."""

    starts: np.ndarray  # (R,) int64
    ends: np.ndarray  # (R,) int64
    cause: np.ndarray  # (R,) int8: transition that ended the row early, or FULL

    def __len__(self) -> int:
        return len(self.starts)

    def padding(self, seq_len: int, transitions: int) -> np.ndarray:
        """(transitions,) int64: padded positions of rows each transition ended early."""
        pad = seq_len - (self.ends - self.starts)
        early = self.cause >= 0
        return np.bincount(self.cause[early], weights=pad[early], minlength=transitions).astype(np.int64)

    def save(self, path) -> None:
        np.savez(path, starts=self.starts, ends=self.ends, cause=self.cause)

    @classmethod
    def load(cls, path) -> "Rows":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["starts"], z["ends"], z["cause"])


def cut_rows(
    read_masks: Callable[[int, int], np.ndarray],
    first: int,
    stop: int,
    limits: Sequence[int],
    seq_len: int,
    chunk: int = CHUNK,
) -> Rows:
    """Greedy rows over input positions ``[first, stop)``; ``read_masks(a, b)`` gives the (S, b - a)
    boundary masks of positions a..b-1 (only ``chunk + seq_len`` positions are held at a time)."""
    starts, ends, causes = [], [], []
    p = first
    while p < stop:
        a, b = p, min(stop, p + chunk)
        reach = Reach(np.asarray(read_masks(a, min(stop, b + seq_len)), dtype=bool), limits, seq_len)
        rows, row_ends, row_causes, nxt = walk(reach, 0, b - a)
        starts.append(rows + a)
        ends.append(row_ends + a)
        causes.append(row_causes)
        p = nxt + a
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return Rows(cat(starts, np.int64), cat(ends, np.int64), cat(causes, np.int8))


def cut_rows_in_memory(masks: np.ndarray, first: int, stop: int, limits: Sequence[int], seq_len: int) -> Rows:
    """:func:`cut_rows` over masks already in memory (S, n)."""
    return cut_rows(lambda a, b: masks[: len(limits), a:b], first, stop, limits, seq_len)


def window_counts(masks: np.ndarray, seq_len: int) -> np.ndarray:
    """(S, windows) boundaries of each stage in the non-overlapping windows of ``seq_len`` positions."""
    windows = masks.shape[1] // seq_len
    return masks[:, : windows * seq_len].reshape(masks.shape[0], windows, seq_len).sum(axis=2)


def auto_max_len(counts: np.ndarray, percentile: float = 99.9, multiple: int = 16) -> int:
    """A stage length that holds ``percentile`` % of the windows' boundary counts, rounded up to ``multiple``."""
    need = int(np.ceil(np.percentile(counts, percentile))) if len(counts) else 1
    return max(multiple, -(-need // multiple) * multiple)


def span_rows(
    reach: np.ndarray, spans: Sequence[tuple[int, int, int]], seq_len: int
) -> list[tuple[int, int, int, int]]:
    """Rows scoring each span ``(context, first, stop)``: the targets of inputs ``first .. stop - 1``,
    read with context from position ``context`` on. ``reach`` (from :func:`row_reach`) bounds every row.

    Returns ``(start, end, a, b)`` per row: inputs ``start .. end - 1``, scoring inputs ``a .. b - 1``.
    Each row starts as early as the context and ``reach`` allow, so it keeps as much context as fits.
    """
    out = []
    for context, first, stop in spans:
        q = first
        while q < stop:
            lo = max(context, q - seq_len + 1)  # a row holding q starts after q - seq_len
            start = lo + int(np.searchsorted(reach[lo : q + 1], q, side="right"))
            end = min(int(reach[start]), stop)
            out.append((start, end, q, end))
            q = end
    return out
