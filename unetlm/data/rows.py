"""Row planning: cut a token stream into rows in which no coarse stage overflows its ``max_len``.

A row is a run of consecutive stream positions ``[start, end)`` read as model inputs (its targets
are positions ``start + 1 .. end``), at most ``seq_len`` long. Stage ``s + 1`` of a row holds one
slot per boundary of ``masks[s]`` inside the row: a BOS is a boundary at every stage and takes a
slot; a row's first position takes one only when it is a boundary. (The masks are nested, as
:func:`unetlm.splitters.splitting.split_document` makes them, so a stage that fits holds exactly
its boundaries and the next stage counts its own mask.) Rows are greedy: each is as long as
``seq_len`` and every stage's ``limits[s]`` allow, and the next row continues the stream at the
position where it stopped, so a row ending early is padded and nothing is dropped or read twice.

Stages whose boundaries a learned splitter decides inside the forward cannot be planned from
the data: only the byte-level masks are passed here, and those stages keep their ``max_len``.
Everything is vectorised numpy over chunks; the greedy walk jumps over runs of full rows.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
import numpy as np

FULL = -1  # the ``cause`` of a row cut by seq_len or the end of the stream, not by a stage

# positions planned per chunk: the per-stage prefix sums of a chunk stay a few tens of MB
CHUNK = 1 << 22


def row_reach(masks: np.ndarray, limits: Sequence[int], seq_len: int, count: int | None = None):
    """(reach, cause) for row starts ``0 .. count - 1`` (default: all ``n`` positions of ``masks``
    (S, n)): a row starting at p may end at ``reach[p]`` (exclusive, ``<= n``) and no later;
    ``cause[p]`` is the transition whose limit cut it there, or :data:`FULL`."""
    n = masks.shape[1]
    count = n if count is None else count
    starts = np.arange(count, dtype=np.int64)
    reach = np.minimum(starts + seq_len, n)
    cause = np.full(count, FULL, dtype=np.int8)
    for s, limit in enumerate(limits):
        prefix = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(masks[s], out=prefix[1:])
        # the furthest e with prefix[e] - prefix[p] <= limit
        ends = np.searchsorted(prefix, prefix[:count] + limit, side="right") - 1
        cut = ends < reach
        reach = np.where(cut, ends, reach)
        cause = np.where(cut, np.int8(s), cause)
    return reach, cause


def walk(reach: np.ndarray, first: int, stop: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Starts of the greedy rows ``first, reach[first], ...`` that lie before ``stop`` (positions
    relative to ``reach``'s origin), and the first start at or after ``stop``."""
    full = reach == np.arange(len(reach)) + seq_len
    out, p, run = [], first, 4096
    while p < stop:
        steps = full[p : min(stop, p + seq_len * run) : seq_len]  # rows that would all be full
        n = int(np.argmin(steps)) if not steps.all() else len(steps)
        out.append(p + seq_len * np.arange(n, dtype=np.int64))
        p += seq_len * n
        if n < len(steps):  # a short row at p
            out.append(np.array([p], dtype=np.int64))
            p = int(reach[p])
    return (np.concatenate(out) if out else np.zeros(0, np.int64)), p


@attrs.define
class RowPlan:
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
    def load(cls, path) -> "RowPlan":
        with np.load(path) as z:
            return cls(z["starts"], z["ends"], z["cause"])


def plan_rows(
    read_masks: Callable[[int, int], np.ndarray],
    first: int,
    stop: int,
    limits: Sequence[int],
    seq_len: int,
    chunk: int = CHUNK,
) -> RowPlan:
    """Greedy rows over input positions ``[first, stop)``; ``read_masks(a, b)`` gives the (S, b - a)
    boundary masks of positions a..b-1 (only ``chunk + seq_len`` positions are held at a time)."""
    starts, ends, causes = [], [], []
    p = first
    while p < stop:
        a, b = p, min(stop, p + chunk)
        masks = np.asarray(read_masks(a, min(stop, b + seq_len)), dtype=bool)
        reach, cause = row_reach(masks, limits, seq_len, count=b - a)
        rows, nxt = walk(reach, p - a, b - a, seq_len)
        starts.append(rows + a)
        ends.append(reach[rows] + a)
        causes.append(cause[rows])
        p = nxt + a
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return RowPlan(cat(starts, np.int64), cat(ends, np.int64), cat(causes, np.int8))


def plan_in_memory(masks: np.ndarray, first: int, stop: int, limits: Sequence[int], seq_len: int) -> RowPlan:
    """:func:`plan_rows` over masks already in memory (S, n)."""
    return plan_rows(lambda a, b: masks[: len(limits), a:b], first, stop, limits, seq_len)


def window_counts(masks: np.ndarray, seq_len: int) -> np.ndarray:
    """(S, windows) boundaries of each stage in the non-overlapping windows of ``seq_len`` positions."""
    n = masks.shape[1] // seq_len * seq_len
    return masks[:, :n].reshape(masks.shape[0], -1, seq_len).sum(axis=2)


def auto_max_len(counts: np.ndarray, percentile: float = 99.9, multiple: int = 16) -> int:
    """A stage length that holds ``percentile`` % of the windows' boundary counts, rounded up to ``multiple``."""
    need = int(np.ceil(np.percentile(counts, percentile))) if len(counts) else 1
    return max(multiple, -(-need // multiple) * multiple)


def plan_spans(
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
