"""Splitter contract.

A splitter marks the byte positions where the next stage gets a vector (a boundary).
``boundaries(data, parent)[t]`` may depend on ``data[:t+1]`` and ``parent[:t+1]`` only, so
``boundaries(x + y)[:len(x)] == boundaries(x)`` for all byte strings x, y. The result must be
a subset of ``parent`` (the previous stage's boundaries; all True for the byte stage), which
keeps the stages nested.
"""
from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np


@attrs.define
class NoOptions:
    """A component without options."""


class Splitter:
    Config: ClassVar[type] = NoOptions
    #: option tables exercised by the registry-wide property tests
    examples: ClassVar[list[dict]] = [{}]

    def __init__(self, config) -> None:
        self.config = config

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        """Bool array of len(data): True where a boundary is. Causal and nested in ``parent``."""
        raise NotImplementedError
