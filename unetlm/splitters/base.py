"""Splitter contract.

A splitter marks the byte positions where the next stage gets a vector (a boundary).
``boundaries(data, parent)[t]`` may depend on ``data[:t+1]`` and ``parent[:t+1]`` only, so
``boundaries(x + y)[:len(x)] == boundaries(x)`` for all byte strings x, y. The result must be
a subset of ``parent`` (the previous stage's boundaries; all True for the byte stage), which
keeps the stages nested.

Chunks: :meth:`Splitter.scan` returns a :class:`Scan` at the start of a document, whose
``feed(chunk, parent)`` gives the decisions at the document's next ``len(chunk)`` bytes, carrying
what later decisions read across chunks; feeding a document in any chunks gives exactly
``boundaries`` of the whole (a chunk may end inside a UTF-8 character). The base class picks a
generic scan (see :meth:`Splitter.scan`): a splitter that declares a bounded ``context`` is re-run
over that many bytes before each chunk; one with an incremental state (``start``) is stepped byte
by byte; any other holds its document whole. ``boundaries`` of a splitter that defines only
``scan`` or only ``start`` is the scan fed the whole document.

For step-by-step generation, :meth:`Splitter.start` returns a :class:`SplitterState` whose
``push(byte, parent)`` gives the decision at the next byte, equal to ``boundaries`` at that
position, at O(1) amortised cost per byte (O(window) for windowed regex patterns).

Identity (what keys prepared data): :meth:`Splitter.identity` gives the options that decide the
boundaries (without :attr:`~Splitter.placement_options`) and the code: the class, its
:attr:`~Splitter.version` (bumped by the author) and :meth:`~Splitter.source_digest`, by default
the sha256 of the source files that hold the class and its splitter bases (see
:func:`source_digest`). :attr:`~Splitter.needs_model` says that the splitter runs a model, so
worker processes that run it are started fresh (spawned), not forked.

A learned splitter (:class:`LearnedSplitter`, ``learned = True``) has no byte API: it is built
as ``cls(config, dim)`` and called inside the forward on the fine stage's hidden states; that
class declares everything the model and the cascade call on it.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import linecache
import sys
from typing import ClassVar, Protocol

import attrs
import numpy as np
import torch
from torch import nn

from unetlm.core.errors import UsageError
from unetlm.core.layout import Link, StageInfo
from unetlm.core.options import NoOptions
from unetlm.core.step import StepInfo, prefill_by_steps, stage_steps
from unetlm.recipe.structure import unstructure


class SplitterIdentityError(UsageError):
    """What decides a splitter's boundaries cannot be told (its source cannot be read, its model is missing)."""


class SplitterState(Protocol):
    def push(self, byte: int, parent: bool) -> bool:
        """Decision at the next byte of the document (``parent``: the finer stage's mask there)."""


class Scan(Protocol):
    def feed(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        """Bool decisions (len(data),) at the document's next bytes ``data`` (``parent``: the finer
        stage's mask there), equal to ``boundaries`` of the whole document at those positions."""


class Splitter:
    Config: ClassVar[type] = NoOptions
    #: option tables exercised by the registry-wide property tests
    examples: ClassVar[list[dict]] = [{}]
    #: True for a splitter that decides from the stage's hidden states inside the model
    #: (an ``nn.Module``; see :mod:`unetlm.splitters.learned`) instead of from bytes
    learned: ClassVar[bool] = False
    #: the rule's version: bump it when the boundaries change in a way the source does not show
    #: (code imported from another module, data files, a library's behaviour)
    version: ClassVar[int] = 1
    #: True when the splitter runs a model (or holds anything else a forked process cannot inherit
    #: safely: threads, a GPU context): processes that prepare data with it are spawned fresh
    needs_model: ClassVar[bool] = False
    #: options that change where the work runs, not which boundaries come out (not in the identity)
    placement_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config) -> None:
        self.config = config

    @property
    def context(self) -> int | None:
        """Bytes one decision reads, the byte itself included, when bounded: with ``context = k``
        the decision at t is the same whether the document starts at 0 or at any s <= t - k + 1
        (``parent`` cut alike). None: unbounded (counters, carried state)."""
        return None

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        """Bool array of len(data): True where a boundary is. Causal and nested in ``parent``."""
        return self.scan().feed(data, parent)

    def scan(self) -> Scan:
        """A fresh evaluation over a document's chunks. Generic: :class:`OverlapScan` when the
        splitter defines ``boundaries`` and a bounded :attr:`context`, else :class:`StateScan` when
        it defines ``start``, else :class:`WholeScan` (memory and time grow with the document)."""
        cls = type(self)
        own_rule = cls.boundaries is not Splitter.boundaries
        if own_rule and self.context is not None:
            return OverlapScan(self, self.context)
        if cls.start is not Splitter.start:
            return StateScan(self.start())
        if own_rule:
            return WholeScan(self)
        raise NotImplementedError(f"splitter {cls.__name__} defines none of boundaries, scan or start")

    def for_documents(self, documents: list[bytes]) -> list["Splitter"]:
        """One splitter per document, each giving this one's boundaries on it; a splitter with a
        model (entropy) runs it over all the documents in batches here, once."""
        return [self] * len(documents)

    def start(self) -> SplitterState:
        """Incremental state at the start of a document (cached generation needs it)."""
        raise NotImplementedError(f"splitter {type(self).__name__} has no incremental state (start)")

    def identity(self) -> dict:
        """What decides this splitter's boundaries, as JSON: ``options`` (the config without
        :attr:`placement_options`) and ``code`` (:meth:`code_identity`). Raises
        :class:`SplitterIdentityError` when it cannot be computed."""
        table = unstructure(self.config)
        return {"options": {k: v for k, v in table.items() if k not in self.placement_options},
                "code": self.code_identity()}

    @classmethod
    def code_identity(cls) -> dict:
        return {"class": f"{cls.__module__}:{cls.__qualname__}", "version": cls.version,
                "source_sha256": cls.source_digest()}

    @classmethod
    def source_digest(cls) -> str | None:
        """sha256 of the source that holds the rule (:func:`source_digest`). Override it to return
        None when the identity should rest on :attr:`version` alone (then bump it by hand)."""
        return source_digest(cls)


@functools.lru_cache(maxsize=None)
def source_digest(cls: type) -> str:
    """sha256 of the source files of ``cls`` and of each splitter class it derives from: the file of
    the module that defines the class (its module-level helpers, tables and patterns are part of
    the rule) and any other file its methods were compiled from (code run with ``exec``, when its
    text is in :mod:`linecache`). Computed once per class object (per process, per import)."""
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        if not issubclass(klass, Splitter):
            continue
        for file, module_globals in _code_files(klass):
            linecache.checkcache(file)
            lines = linecache.getlines(file, module_globals)
            if not lines:
                raise SplitterIdentityError(
                    f"splitter class {cls.__module__}.{cls.__qualname__}: its identity cannot be computed: the "
                    f"source of {klass.__qualname__} ({file}) cannot be read; install the splitter with its source, "
                    f"or override source_digest() to return None and bump its version when the rule changes"
                )
            digest.update(f"{klass.__module__}:{klass.__qualname__}\0".encode())
            digest.update("".join(lines).encode("utf-8", errors="surrogateescape"))
    return digest.hexdigest()


def _code_files(klass: type) -> list[tuple[str, dict | None]]:
    """(file name, module globals) of the module that defines ``klass`` and of every file its own
    methods were compiled from, in order, each once."""
    module = sys.modules.get(klass.__module__)
    found: dict[str, dict | None] = {}
    module_file = getattr(module, "__file__", None)
    if module_file:
        found[inspect.getsourcefile(module) or module_file] = vars(module)
    for value in vars(klass).values():
        for function in (getattr(value, "__func__", value), getattr(value, "fget", None)):
            code = getattr(function, "__code__", None)
            if code is not None:
                found.setdefault(code.co_filename, None)
    return list(found.items())


class OverlapScan:
    """``boundaries`` re-run over the last ``context - 1`` bytes fed before (and their parent
    marks) followed by the new chunk; exact for a splitter whose decisions read ``context`` bytes."""

    def __init__(self, splitter: Splitter, context: int) -> None:
        self.splitter, self.keep = splitter, context - 1
        self.tail, self.tail_parent = b"", np.zeros(0, dtype=bool)

    def feed(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        parent = np.asarray(parent, dtype=bool)
        if not len(data):
            return np.zeros(0, dtype=bool)
        text = self.tail + bytes(data)
        marks = np.concatenate([self.tail_parent, parent])
        out = np.asarray(self.splitter.boundaries(text, marks), dtype=bool)[len(self.tail) :]
        if self.keep:
            self.tail, self.tail_parent = text[-self.keep :], marks[-self.keep :]
        return out


class StateScan:
    """A splitter's incremental state stepped over each byte (O(state) memory, a Python call per byte)."""

    def __init__(self, state: SplitterState) -> None:
        self.push = state.push

    def feed(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        marks = np.asarray(parent, dtype=bool).tolist()
        return np.fromiter(map(self.push, bytes(data), marks), dtype=bool, count=len(data))


class WholeScan:
    """The document so far held whole and ``boundaries`` re-run over all of it at each chunk: the
    fallback for a splitter with neither a bounded context nor an incremental state."""

    def __init__(self, splitter: Splitter) -> None:
        self.splitter, self.data, self.parent = splitter, bytearray(), np.zeros(0, dtype=bool)

    def feed(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        seen = len(self.data)
        self.data += data
        self.parent = np.concatenate([self.parent, np.asarray(parent, dtype=bool)])
        return np.asarray(self.splitter.boundaries(bytes(self.data), self.parent), dtype=bool)[seen:]


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
