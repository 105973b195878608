"""Splitter contract.

A splitter marks the byte positions where the next stage gets a vector (a boundary).
``boundaries(data, parent)[t]`` may depend on ``data[:t+1]`` and ``parent[:t+1]`` only, so
``boundaries(x + y)[:len(x)] == boundaries(x)`` for all byte strings x, y. The result must be
a subset of ``parent`` (the previous stage's boundaries; all True for the byte stage), which
keeps the stages nested.

For step-by-step generation, :meth:`Splitter.start` returns a :class:`SplitterState` whose
``push(byte, parent)`` gives the decision at the next byte, equal to ``boundaries`` at that
position, at O(1) amortised cost per byte (O(window) for windowed regex patterns).

A learned splitter (:class:`LearnedSplitter`, ``learned = True``) has no byte API: it is built
as ``cls(config, dim)`` and called inside the forward on the fine stage's hidden states; that
class declares everything the model and the cascade call on it.
"""
from __future__ import annotations

from typing import ClassVar, Protocol

import attrs
import numpy as np
import torch
from torch import nn

from unetlm.core.layout import Link, StageInfo
from unetlm.core.options import NoOptions
from unetlm.core.step import StepInfo, prefill_by_steps, stage_steps


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


@attrs.define  # not frozen: torch.compile cannot trace the __init__ of frozen attrs classes
class Chunking:
    """A learned splitter's decisions over a fine stage, each (B, Lf); or, from ``step``, at one
    new fine position, each (B,)."""

    prob: torch.Tensor  # float: p_t (0 at padding)
    boundary: torch.Tensor  # bool: a boundary at valid positions


class LearnedSplitter(Splitter, nn.Module):
    """A splitter that decides inside the model from the fine stage's hidden states.

    What the model calls, per transition whose splitter is learned:

    * ``forward(h (B, Lf, d), info) -> Chunking``: the decision at t reads ``h[..t]`` only;
    * ``smooth(coarse (B, Lc, d_c), link, chunking)``: applied to the coarse stage's outputs before
      upsampling (default: unchanged); causal over chunks;
    * ``confidence(chunking) -> (B, Lf, 1)``: multiplies the upsampled vectors (default: ones);
    * ``ratio_loss(chunking, info)``: a scalar added to the training objective (default: none).

    What the cascade calls (the step protocol of :mod:`unetlm.core.step`): ``init_state``,
    ``step(h (B, d), state, info: StepInfo) -> (Chunking of (B,) tensors, state)`` and
    ``prefill(h, state, info: StageInfo) -> (Chunking, state)`` for the decisions; then, with the
    coarse stage's new output, ``smooth_step(coarse (B, d_c), state) -> (coarse, state)`` (the
    cascade keeps the state of rows where the coarse stage did not fire), after a prefill
    ``smooth_prefill(coarse, state, link, chunking)``. In generation ``confidence`` must be one
    in value (it may carry a gradient only).
    """

    learned = True

    def __init__(self, config, dim: int) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.dim = dim

    def forward(self, h: torch.Tensor, info: StageInfo) -> Chunking:
        raise NotImplementedError

    def smooth(self, coarse: torch.Tensor, link: Link, chunking: Chunking) -> torch.Tensor:
        return coarse

    def confidence(self, chunking: Chunking) -> torch.Tensor:
        return torch.ones_like(chunking.prob).unsqueeze(-1)

    def ratio_loss(self, chunking: Chunking, info: StageInfo) -> torch.Tensor | None:
        return None

    def init_state(self, batch: int, max_len: int, device, dtype):
        raise NotImplementedError

    def step(self, h: torch.Tensor, state, info: StepInfo) -> tuple[Chunking, object]:
        raise NotImplementedError

    def prefill(self, h: torch.Tensor, state, info: StageInfo) -> tuple[Chunking, object]:
        """``forward``'s decisions and the state after each row's valid positions (by default:
        ``step`` over the positions)."""
        return self.forward(h, info), prefill_by_steps(self.step, state, h.unbind(1), stage_steps(info))

    def smooth_step(self, coarse: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        return coarse, state

    def smooth_prefill(self, coarse: torch.Tensor, state, link: Link, chunking: Chunking):
        """``smooth``'s output and the state after it (override with ``smooth_step`` when it keeps one)."""
        return self.smooth(coarse, link, chunking), state

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} is learned: it decides from hidden states inside the model")
