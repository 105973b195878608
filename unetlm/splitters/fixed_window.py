"""A boundary every ``size`` positions of the finer stage (MegaByte, Hourglass)."""
from __future__ import annotations

import attrs
import numpy as np

from unetlm.recipe.validators import positive
from unetlm.splitters.base import Splitter


@attrs.define
class FixedWindowConfig:
    size: int = attrs.field(default=4, validator=positive)  # finer-stage positions per boundary
    first: bool = False  # mark the first position of each window instead of the last


class FixedWindowSplitter(Splitter):
    """Counts parent positions: a boundary at the last (or first) of every ``size`` of them."""

    Config = FixedWindowConfig
    examples = [{"size": 1}, {"size": 3}, {"size": 4, "first": True}]

    @property
    def phase(self) -> int:
        return 0 if self.config.first else self.config.size - 1

    def scan(self) -> FixedWindowScan:
        return FixedWindowScan(self.config.size, self.phase)

    def start(self) -> FixedWindowState:
        return FixedWindowState(self.config.size, self.phase)


class FixedWindowScan:
    """Counts parent positions across chunks."""

    def __init__(self, size: int, phase: int) -> None:
        self.size, self.phase, self.seen = size, phase, 0

    def feed(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        parent = np.asarray(parent, dtype=bool)
        index = self.seen + np.cumsum(parent) - 1  # rank of each parent position in the document (causal)
        self.seen += int(parent.sum())
        return parent & (index % self.size == self.phase)


class FixedWindowState:
    """Counts parent positions so far: O(1) per byte."""

    __slots__ = ("size", "phase", "seen")

    def __init__(self, size: int, phase: int) -> None:
        self.size, self.phase, self.seen = size, phase, 0

    def push(self, byte: int, parent: bool) -> bool:
        if not parent:
            return False
        index, self.seen = self.seen, self.seen + 1
        return index % self.size == self.phase
