"""The corpora a training run reads, opened for :class:`~unetlm.data.windows.TrainingData`.

Plain sources (``data.source``) are read and packed in RAM.
"""
from __future__ import annotations

from collections.abc import Sequence

from unetlm.data.sources import load_documents
from unetlm.data.windows import TrainingData
from unetlm.recipe.schema import DataSpec


def open_training_data(
    spec: DataSpec, seq_len: int, splitters, lengths: Sequence[int], tokenizer, batch_size: int, seed: int
) -> TrainingData:
    """Batches of ``spec``'s data for a model with byte-level ``splitters`` and per-stage ``lengths``
    (``lengths[0]`` = seq_len); the stages the splitters feed are planned never to overflow."""
    limits = list(lengths[1 : 1 + len(splitters)])
    documents = load_documents(spec)
    return TrainingData.from_documents(
        documents, splitters, limits, seq_len, batch_size, spec.valid_fraction, seed, tokenizer
    )
