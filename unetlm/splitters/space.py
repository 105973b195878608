"""Space patching (SpaceByte; BLT's space patching).

A byte is *space-like* when it is not an ASCII letter or digit and not a UTF-8 continuation
byte (0x80-0xBF); UTF-8 lead bytes (0xC0-0xFF) count as space-like, so every multi-byte
character opens a patch. A boundary sits at byte t when byte t is space-like and byte t-1
is not, and always at the first byte. Each decision reads bytes t-1 and t only (stable);
the incremental state (:meth:`SpaceSplitter.start`) keeps the previous byte's class.
"""
from __future__ import annotations

import numpy as np

from unetlm.splitters.base import Splitter

SPACE_LIKE = np.ones(256, dtype=bool)
for _lo, _hi in ((ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("a"), ord("z")), (0x80, 0xBF)):
    SPACE_LIKE[_lo : _hi + 1] = False


def space_boundaries(data: bytes) -> np.ndarray:
    like = SPACE_LIKE[np.frombuffer(data, dtype=np.uint8)]
    out = like.copy()
    out[1:] &= ~like[:-1]
    out[:1] = True
    return out


class SpaceSplitter(Splitter):
    """No options: the rule is fixed by the papers."""

    context = 2

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        return space_boundaries(data) & parent

    def start(self) -> SpaceState:
        return SpaceState()


class SpaceState:
    """The previous byte's class: O(1) per byte."""

    __slots__ = ("prev_like",)

    def __init__(self) -> None:
        self.prev_like: bool | None = None  # None before the first byte

    def push(self, byte: int, parent: bool) -> bool:
        like = bool(SPACE_LIKE[byte])
        fire = self.prev_like is None or (like and not self.prev_like)
        self.prev_like = like
        return parent and fire
