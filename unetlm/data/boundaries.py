"""Boundary statistics of data for a recipe's byte-level stages, and ``max_len = "auto"``.

For each stage fed by a byte-level splitter: the share of non-overlapping ``seq_len`` windows
holding more boundaries than the stage's ``max_len`` (windows a fixed cut would overflow), the
``max_len`` that "auto" picks (the :data:`AUTO_PERCENTILE` percentile of boundaries per window,
rounded up to a multiple of :data:`AUTO_MULTIPLE` for kernels, at most the finer stage's length),
and the share of row positions that rows (:mod:`unetlm.data.rows`) pad because the stage
would overflow. Statistics come from the first :data:`SAMPLE_BYTES` bytes of the data.
"""
from __future__ import annotations

from collections.abc import Iterable

import attrs
import numpy as np

from unetlm.data.packing import pack
from unetlm.data.rows import auto_max_len, cut_rows_in_memory, window_counts
from unetlm.recipe import Recipe, recipe_from_dict
from unetlm.recipe.schema import ModelSpec

SAMPLE_BYTES = 8 << 20
AUTO_PERCENTILE = 99.9
AUTO_MULTIPLE = 16


def recipe_splitters(spec: ModelSpec) -> list:
    """The recipe's leading byte-level splitters (those the data can be split by), built from their configs."""
    out = []
    for stage in spec.stages[1:]:
        cls = stage.splitter.build_class()
        if cls.learned:
            break
        out.append(cls(stage.splitter.config))
    return out


def sample_masks(documents: Iterable[bytes], splitters, limit: int = SAMPLE_BYTES) -> np.ndarray:
    """(len(splitters), n) boundary masks of the packed stream of the first ``limit`` bytes of ``documents``."""
    taken, total = [], 0
    for data in documents:
        taken.append(data[: limit - total])
        total += len(taken[-1]) + 1
        if total >= limit:
            break
    return pack(taken, splitters).masks


@attrs.define
class StageStats:
    stage: int
    max_len: int | str  # as the recipe gives it ("auto" included)
    auto: int  # what "auto" picks on this data
    overflow: float  # share of seq_len windows with more boundaries than max_len (auto: the picked one)
    padding: float  # share of row positions padded because this stage would overflow


def stage_stats(spec: ModelSpec, masks: np.ndarray) -> list[StageStats]:
    """Statistics of each byte-level stage (1 .. len(masks)) on a sample's ``masks``."""
    counts = window_counts(masks, spec.seq_len)
    picks, lengths = auto_lengths(spec, counts)
    rows = cut_rows_in_memory(masks, 0, max(masks.shape[1] - 1, 0), lengths, spec.seq_len)
    padding = rows.padding(spec.seq_len, len(lengths)) / max(len(rows) * spec.seq_len, 1)
    return [
        StageStats(
            t + 1, spec.stages[t + 1].max_len, picks[t],
            float((counts[t] > lengths[t]).mean()) if counts.shape[1] else 0.0, float(padding[t]),
        )
        for t in range(len(lengths))
    ]


def auto_lengths(spec: ModelSpec, counts: np.ndarray) -> tuple[list[int], list[int]]:
    """(what "auto" picks, the lengths in use: "auto" replaced by its pick) for byte-level stages
    1 .. len(counts); a pick never exceeds the finer stage's length in use."""
    picks, lengths, finer = [], [], spec.seq_len
    for t in range(counts.shape[0]):
        picks.append(min(auto_max_len(counts[t], AUTO_PERCENTILE, AUTO_MULTIPLE), finer))
        given = spec.stages[t + 1].max_len
        finer = picks[-1] if given == "auto" else given
        lengths.append(finer)
    return picks, lengths


def with_auto_lengths(recipe: Recipe, documents: Iterable[bytes] | None = None) -> Recipe:
    """``recipe`` with every ``max_len = "auto"`` sized from its data (``documents``; default: its
    first prepared directory, else its sources)."""
    if not recipe.model.auto_lengths:
        return recipe
    if documents is None and recipe.data.prepared_dirs:
        from unetlm.data.prepared import PreparedCorpus

        corpus = PreparedCorpus.open(recipe.data.prepared_dirs[0].path, recipe)
        masks = corpus.read_masks(0, min(corpus.num_tokens, SAMPLE_BYTES))
    else:
        from unetlm.data.sources import documents as joined, head, iter_pieces

        if documents is None:  # the sample's head only, however long its documents
            documents = joined(head(iter_pieces(recipe.data), SAMPLE_BYTES))
        masks = sample_masks(documents, recipe_splitters(recipe.model))
    _, lengths = auto_lengths(recipe.model, window_counts(masks, recipe.model.seq_len))
    table = recipe.to_dict()
    for t, n in enumerate(lengths):
        table["model"]["stages"][t + 1]["max_len"] = n
    return recipe_from_dict(table)
