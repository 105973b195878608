"""Training and validation batches of rows, drawn as one permutation per epoch.

A corpus is anything with ``num_tokens``, ``num_bytes``, ``token_at_byte(n)``, ``read(start, stop)``
giving a :class:`~unetlm.data.packing.TokenStream` and ``read_masks(start, stop)`` giving its masks
alone (a prepared directory, or :class:`StreamCorpus` in RAM).
Its last ``valid_fraction`` of stream bytes is held out. Each split is cut into rows by
:mod:`unetlm.data.rows` (no stage overflows; a row ending early is padded with PAD, whose
targets are ignored). Training row slot ``j = step * batch_size + i`` of a corpus with R rows
reads row ``perm_e[j % R]`` of epoch ``e = j // R``, ``perm_e`` a permutation seeded by
(seed, corpus, e): each row, hence each byte, once per epoch, and every batch a pure function of
(seed, step) whatever the number of processes. With several corpora (a mixture), each block of
:data:`BLOCK` slots gives corpus c its share ``weight_c`` of slots, at positions shuffled by
(seed, block); each corpus walks its own permutations.
"""
from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import torch

from unetlm.core.tokens import BYTES, PAD
from unetlm.data.packing import Batch, TokenStream, pack, shard_rows, training_cut
from unetlm.data.rows import Rows, cut_rows
from unetlm.recipe.errors import RecipeError

BLOCK = 4096  # mixture slots whose corpus shares are exact


@attrs.define
class StreamCorpus:
    """A packed stream held in RAM, read like a prepared directory."""

    stream: TokenStream
    lengths: np.ndarray  # (vocab,) bytes each id stands for

    @property
    def num_tokens(self) -> int:
        return len(self.stream)

    @property
    def num_bytes(self) -> int:
        return int(self.lengths[self.stream.tokens].sum())

    def read(self, start: int, stop: int) -> TokenStream:
        return self.stream.read(start, stop)

    def read_masks(self, start: int, stop: int) -> np.ndarray:
        return self.stream.masks[:, start:stop]

    def token_at_byte(self, n: int) -> int:
        """The number of tokens that end at or before stream byte ``n`` (a BOS counts as one byte),
        as a prepared corpus counts: a token that straddles ``n`` is held out."""
        return int(np.searchsorted(np.cumsum(self.lengths[self.stream.tokens]), n, "right"))


def split_point(corpus, valid_fraction: float) -> int:
    """The first held-out token: the last ``valid_fraction`` of the stream's bytes is held out."""
    return corpus.token_at_byte(training_cut(corpus.num_bytes, valid_fraction))


def read_rows(parts: list[tuple[object, int, int]], seq_len: int) -> Batch:
    """Rows ``(corpus, start, end)`` (inputs ``start .. end - 1``, targets one further) as a batch
    of ``seq_len`` columns; a shorter row is padded with PAD (document id: its last one)."""
    n = len(parts)
    tokens = np.full((n, seq_len + 1), PAD, dtype=np.int64)
    doc = np.zeros((n, seq_len), dtype=np.int64)
    masks = None
    for i, (corpus, start, end) in enumerate(parts):
        part = corpus.read(start, end + 1)
        width = end - start
        if masks is None:
            masks = np.zeros((part.masks.shape[0], n, seq_len), dtype=bool)
        tokens[i, : width + 1] = part.tokens
        doc[i, :width] = part.doc[:width]
        doc[i, width:] = part.doc[width - 1]
        masks[:, i, :width] = part.masks[:, :width]
    t = torch.from_numpy(tokens)
    return Batch(t[:, :-1], torch.from_numpy(doc), [torch.from_numpy(m) for m in masks], t[:, 1:])


@attrs.define
class Source:
    """One corpus of a (possibly one-part) mixture: its rows before and after the held-out cut."""

    corpus: object
    train: Rows
    valid: Rows
    weight: float = 1.0


def check_size(corpus, valid_fraction: float, seq_len: int) -> None:
    """Both parts of the corpus must hold one whole sequence (``seq_len + 1`` tokens)."""
    cut = split_point(corpus, valid_fraction)
    if min(cut, corpus.num_tokens - cut) >= seq_len + 1:
        return
    needed = int(np.ceil((seq_len + 1) / max(min(valid_fraction, 1.0 - valid_fraction), 1e-9)))
    raise RecipeError(
        f"the data holds {corpus.num_bytes:,} stream bytes (each document's BOS counts as one; {cut:,} "
        f"training and {corpus.num_tokens - cut:,} held-out tokens with data.valid_fraction = "
        f"{valid_fraction}); one sequence of model.seq_len = {seq_len} "
        f"needs {seq_len + 1} tokens in each part, i.e. about {needed:,} bytes: add data or lower model.seq_len"
    )


def source_rows(corpus, valid_fraction: float, limits: Sequence[int], seq_len: int, weight: float = 1.0) -> Source:
    """Rows of ``corpus``'s training and held-out parts (each row's last target inside its part)."""
    cut = split_point(corpus, valid_fraction)
    return Source(
        corpus,
        cut_rows(corpus.read_masks, 0, max(cut - 1, 0), limits, seq_len),
        cut_rows(corpus.read_masks, cut, max(corpus.num_tokens - 1, cut), limits, seq_len),
        weight,
    )


def shares(weights: Sequence[float], block: int = BLOCK) -> np.ndarray:
    """Slots per block for each weight (largest remainder, summing to ``block``)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[: block - out.sum()]] += 1
    return out


@attrs.define
class TrainingData:
    """Batches of rows; ``train_batch(step, rank, world)`` and ``valid_batches`` are the interface."""

    sources: list[Source]
    seq_len: int
    batch_size: int
    seed: int
    transitions: int  # stage transitions the rows are cut for (byte-level splitters)
    _perms: dict = attrs.field(factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        corpora: Sequence[tuple[object, float]],
        limits: Sequence[int],
        seq_len: int,
        batch_size: int,
        valid_fraction: float,
        seed: int,
        rows_of=None,
    ) -> "TrainingData":
        """Cut the rows of each (corpus, weight) with ``rows_of`` (default :func:`source_rows`);
        ``limits``: max_len of each stage after the first that the rows are cut for."""
        sources = []
        for corpus, weight in corpora:
            check_size(corpus, valid_fraction, seq_len)
            sources.append((rows_of or source_rows)(corpus, valid_fraction, limits, seq_len, weight))
        return cls(sources, seq_len, batch_size, seed, len(limits))

    @classmethod
    def from_documents(
        cls, documents, splitters, limits, seq_len: int, batch_size: int, valid_fraction: float, seed: int,
        tokenizer=BYTES,
    ) -> "TrainingData":
        """One corpus packed in RAM from ``documents`` (tests and benchmarks; training reads prepared data)."""
        corpus = StreamCorpus(pack(documents, splitters, tokenizer), tokenizer.lengths)
        return cls.build([(corpus, 1.0)], limits, seq_len, batch_size, valid_fraction, seed)

    def _perm(self, c: int, epoch: int) -> np.ndarray:
        key = (c, epoch)
        if key not in self._perms:
            if len(self._perms) > 2 * len(self.sources):
                self._perms.clear()
            rng = np.random.default_rng([self.seed, c, epoch])
            self._perms[key] = rng.permutation(len(self.sources[c].train))
        return self._perms[key]

    def _slots(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus, that corpus's slot number) of global slots ``first .. first + count - 1``."""
        slots = np.arange(first, first + count, dtype=np.int64)
        if len(self.sources) == 1:
            return np.zeros(count, dtype=np.int64), slots
        q = shares([s.weight for s in self.sources])
        corpus, index = np.empty(count, np.int64), np.empty(count, np.int64)
        for block in np.unique(slots // BLOCK):
            layout = np.random.default_rng([self.seed, len(self.sources), int(block)]).permutation(
                np.repeat(np.arange(len(q)), q)
            )
            seen = np.zeros((len(q), BLOCK), dtype=np.int64)  # slots of each corpus before each position
            seen[layout, np.arange(BLOCK)] = 1
            seen = np.cumsum(seen, axis=1) - seen
            here = slots // BLOCK == block
            pos = slots[here] % BLOCK
            corpus[here] = layout[pos]
            index[here] = int(block) * q[layout[pos]] + seen[layout[pos], pos]
        return corpus, index

    def train_rows(self, step: int) -> list[tuple[int, int]]:
        """(corpus, row) of each row of the global batch of ``step``."""
        corpus, index = self._slots(step * self.batch_size, self.batch_size)
        out = []
        for c, j in zip(corpus.tolist(), index.tolist()):
            rows = len(self.sources[c].train)
            out.append((c, int(self._perm(c, j // rows)[j % rows])))
        return out

    def epoch(self, step: int) -> int:
        """The epoch of the first corpus that the global batch of ``step`` reads (its first row's)."""
        corpus, index = self._slots(step * self.batch_size, 1)
        return int(index[0] // len(self.sources[int(corpus[0])].train))

    def _batch(self, picks: list[tuple[int, int]], split: str) -> Batch:
        chosen = [(self.sources[c].corpus, getattr(self.sources[c], split), r) for c, r in picks]
        return read_rows([(corpus, int(rows.starts[r]), int(rows.ends[r])) for corpus, rows, r in chosen], self.seq_len)

    def train_batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        """Rank ``rank``'s rows ``[rank*B/W, (rank+1)*B/W)`` of the global batch of ``step``."""
        return self._batch(shard_rows(self.train_rows(step), rank, world), "train")

    def valid_batches(self, count: int, rank: int = 0, world: int = 1) -> list[Batch]:
        """``count`` fixed global batches of held-out rows spread evenly over every corpus (this rank's rows)."""
        ends = np.cumsum([len(s.valid) for s in self.sources])
        n = count * self.batch_size
        flat = np.linspace(0, ends[-1] - 1, n).astype(np.int64)
        corpus = np.searchsorted(ends, flat, side="right")
        chosen = [(int(c), int(i - ends[c] + len(self.sources[c].valid))) for c, i in zip(corpus, flat)]
        return [
            self._batch(shard_rows(chosen[i : i + self.batch_size], rank, world), "valid")
            for i in range(0, n, self.batch_size)
        ]

    def step_metrics(self, step: int) -> dict:
        """What metrics.jsonl records about the data of step ``step`` (0-based): its epoch and the
        positions each transition padded in its global batch."""
        pad = np.zeros(self.transitions, dtype=np.int64)
        for c, r in self.train_rows(step):
            rows = self.sources[c].train
            if rows.cause[r] >= 0:
                pad[rows.cause[r]] += self.seq_len - (rows.ends[r] - rows.starts[r])
        return {"epoch": self.epoch(step), "padding": pad.tolist()}

    def describe(self) -> str:
        """One line: rows, epochs' size, and the padding share each transition costs."""
        rows = sum(len(s.train) for s in self.sources)
        slots = rows * self.seq_len
        pad = sum(s.train.padding(self.seq_len, self.transitions) for s in self.sources)
        per_stage = ", ".join(f"stage {t + 1}: {p / max(slots, 1):.2%}" for t, p in enumerate(pad))
        steps = rows / self.batch_size
        return (
            f"data: {rows:,} training rows of up to {self.seq_len} tokens ({steps:,.1f} steps per epoch)"
            + (f"; padding where a stage would overflow: {per_stage}" if self.transitions else "")
        )

