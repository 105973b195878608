"""Splitter contract.

A splitter marks the byte positions where the next stage gets a vector (a boundary).
``boundaries(data, parent)[t]`` may depend on ``data[:t+1]`` and ``parent[:t+1]`` only, so
``boundaries(x + y)[:len(x)] == boundaries(x)`` for all byte strings x, y. The result must be
a subset of ``parent`` (the previous stage's boundaries; all True for the byte stage), which
keeps the stages nested.

For step-by-step generation, :meth:`Splitter.start` returns a :class:`SplitterState` whose
``push(byte, parent)`` gives the decision at the next byte, equal to ``boundaries`` at that
position, at O(1) amortised cost per byte (O(window) for windowed regex patterns).

A splitter with ``learned = True`` has no byte API: it is built as ``cls(config, dim)`` and
called inside the forward on the fine stage's hidden states.
"""
from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np

from unetlm.core.options import NoOptions


class SplitterState(Protocol):
    def push(self, byte: int, parent: bool) -> bool:
        """Decision at the next byte of the document (``parent``: the finer stage's mask there)."""


class Splitter:
    Config: ClassVar[type] = NoOptions
    #: option tables exercised by the registry-wide property tests
    examples: ClassVar[list[dict]] = [{}]
    #: True for a splitter that decides from the stage's hidden states inside the model
    #: (an ``nn.Module``; see :mod:`unetlm.splitters.learned`) instead of from bytes
    learned: ClassVar[bool] = False

    def __init__(self, config) -> None:
        self.config = config

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        """Bool array of len(data): True where a boundary is. Causal and nested in ``parent``."""
        raise NotImplementedError

    def for_documents(self, documents: list[bytes]) -> list["Splitter"]:
        """One splitter per document, each giving this one's boundaries on it; a splitter with a
        model (entropy) runs it over all the documents in batches here, once."""
        return [self] * len(documents)

    def start(self) -> SplitterState:
        """Incremental state at the start of a document (cached generation needs it)."""
        raise NotImplementedError(f"splitter {type(self).__name__} has no incremental state (start)")
