"""Entropy patching (BLT): a small causal byte LM decides where patches end.

Mapping to unetlm's convention. BLT starts a new patch at byte t+1 when the entropy of
predicting it, H(x[t+1] | x[..t]), exceeds a threshold. A unetlm boundary marks the *last*
position of a patch (the coarse vector may contain its information and is handed to
positions at or after it), so the boundary is at t: the model has read bytes 0..t and is
uncertain about the next one, so the patch ends here and byte t+1 opens the next one. Every
decision thus depends on bytes 0..t only (stability), and the first byte always opens a
patch because the document's BOS token is a boundary at every stage.

Rules, with H[t] = entropy (nats) of the model's next-byte distribution after bytes 0..t:

* global (default, threshold 1.335 as published): boundary at t when H[t] > threshold;
* relative (BLT's "monotonic" rule): H[t] - H[t-1] > relative_threshold, where H[-1] is the
  entropy after BOS alone; given both thresholds, both must hold (BLT's combined rule);
* ``max_patch``: a boundary is forced once a patch holds that many parent positions.

The entropy model is a unetlm checkpoint (train ``recipes/entropy-model.toml``), loaded
through the loader the layers above install (:mod:`unetlm.splitters.entropy_models`). It reads the
document through fixed-shape windows of ``context`` tokens (default: its ``seq_len``), the
first starting with BOS, the next ones every ``context // 2`` tokens; each position takes its
entropy from the window where it has at least ``context // 2`` tokens of history (or all of
it), and that window depends on the position only, so cropping or extending a document never
changes an earlier entropy. Entropies can be cached on disk (``cache_dir``), keyed by a hash
of the checkpoint, the context and the bytes (whole documents only: a document fed in chunks,
:meth:`EntropySplitter.scan`, is not cached).

Chunks: the scan keeps the document's newest ``context`` tokens, the entropy after the last one
and the open patch's length; each chunk runs the windows that own its positions, a window cut
by the chunk's end running again, with more tokens, for the positions it owns in the next one.
Identity: the checkpoint counts by its content (the sha256 of its files), and ``device`` and
``cache_dir`` not at all (they change where the work runs, not the boundaries).
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import attrs
import numpy as np
import torch

from unetlm.core.tokens import BOS, PAD
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.validators import positive
from unetlm.splitters.base import Splitter, SplitterIdentityError
from unetlm.splitters.entropy_models import entropy_models

BLT_THRESHOLD = 1.335  # nats; BLT's published global threshold
EXAMPLE_CHECKPOINT = "runs/entropy-model"
TRAIN_HINT = f"train one with: unetlm train recipes/entropy-model.toml --out {EXAMPLE_CHECKPOINT}"


@attrs.define
class EntropyConfig:
    checkpoint: str  # path of a unetlm checkpoint of a causal byte LM
    threshold: float | None = None  # nats; 1.335 unless only relative_threshold is given
    relative_threshold: float | None = None  # nats; BLT's monotonic rule H[t] - H[t-1] > it
    max_patch: int | None = attrs.field(default=None, validator=positive)  # parent positions per patch
    context: int | None = attrs.field(default=None, validator=positive)  # window tokens; default: model seq_len
    cache_dir: str | None = None  # where to keep computed entropies (one .npy per document)
    device: str = "cpu"

    def __attrs_post_init__(self) -> None:
        if not self.checkpoint:
            raise RecipeError(f"checkpoint = '' is invalid: expected the path of an entropy model checkpoint; {TRAIN_HINT}")

    def global_threshold(self) -> float | None:
        if self.threshold is not None:
            return self.threshold
        return None if self.relative_threshold is not None else BLT_THRESHOLD


BATCH_ROWS = {"cpu": 64, "cuda": 1024}  # windows per forward when documents are split in batches


def entropy_boundaries(
    entropy: np.ndarray,
    parent: np.ndarray,
    threshold: float | None,
    relative: float | None = None,
    max_patch: int | None = None,
) -> np.ndarray:
    """Boundaries (n,) from entropies (n + 1,): ``entropy[i]`` follows token i of BOS + data,
    so the decision at data byte t reads ``entropy[t + 1]`` (and ``entropy[t]``)."""
    return patch_ends(entropy, parent, threshold, relative, max_patch)[0]


def patch_ends(
    entropy: np.ndarray,
    parent: np.ndarray,
    threshold: float | None,
    relative: float | None = None,
    max_patch: int | None = None,
    since: int = 0,
) -> tuple[np.ndarray, int]:
    """:func:`entropy_boundaries` of bytes that follow an open patch of ``since`` parent
    positions; also the open patch's length after them."""
    entropy = np.asarray(entropy, dtype=np.float64)  # compare as EntropyState does
    after, before = entropy[1:], entropy[:-1]
    fire = np.asarray(parent, dtype=bool).copy()
    if threshold is not None:
        fire &= after > threshold
    if relative is not None:
        fire &= after - before > relative
    if max_patch is None:
        return fire, 0
    out = np.zeros_like(fire)
    for t in np.flatnonzero(parent):
        since += 1
        if fire[t] or since == max_patch:
            out[t] = True
            since = 0
    return out, since


@functools.lru_cache(maxsize=8)
def _load(path: str, stamp: tuple, device: str):
    return entropy_models().load(path, device)


def _stamp(path: Path) -> tuple:
    """(name, mtime, size) of every file the checkpoint at ``path`` is read from."""
    return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in entropy_models().files(path.resolve()))


def load_entropy_model(path: str | Path, device: str = "cpu"):
    """The checkpoint's model in eval mode, loaded once per process (reloaded if its files change)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"entropy model checkpoint {str(path)!r} does not exist; {TRAIN_HINT}")
    return _load(str(path.resolve()), _stamp(path), device)


@functools.lru_cache(maxsize=8)
def _digest(stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class EntropySplitter(Splitter):
    Config = EntropyConfig
    # the checkpoint that TRAIN_HINT writes; the registry-wide tests point it at a tiny random model
    examples = [
        {"checkpoint": EXAMPLE_CHECKPOINT, "threshold": 4.0},
        {"checkpoint": EXAMPLE_CHECKPOINT, "relative_threshold": 0.0},
        {"checkpoint": EXAMPLE_CHECKPOINT, "threshold": 3.5, "relative_threshold": 0.1, "max_patch": 3},
        {"checkpoint": EXAMPLE_CHECKPOINT, "threshold": 4.0, "context": 16},
    ]
    needs_model = True
    placement_options = frozenset({"device", "cache_dir"})

    @property
    def model(self):
        return load_entropy_model(self.config.checkpoint, self.config.device)

    def identity(self) -> dict:
        """The options with the checkpoint known by its content, wherever it lies."""
        out = super().identity()
        path = Path(self.config.checkpoint)
        if not path.exists():
            raise SplitterIdentityError(
                f"entropy splitter: checkpoint {str(path)!r} does not exist, so the boundaries it decides cannot "
                f"be identified; {TRAIN_HINT}"
            )
        out["options"]["checkpoint"] = {"sha256": _digest(_stamp(path))}
        return out

    def window(self) -> tuple[int, int]:
        """(context, stride) in tokens."""
        context = self.config.context or self.model.spec.seq_len
        if context > self.model.spec.seq_len:
            raise RecipeError(
                f"entropy splitter: context = {context} exceeds the entropy model's seq_len {self.model.spec.seq_len}"
            )
        return context, max(1, context // 2)

    @torch.inference_mode()
    def _rows_entropy(self, rows: np.ndarray) -> np.ndarray:
        """(B, context) float32 entropies after each token of (B, context) PAD-filled token rows."""
        x = torch.from_numpy(rows).to(self.config.device)
        logp = torch.log_softmax(self.model(x).logits[:, :, : BOS + 1].float(), dim=-1)
        return (-(logp.exp() * logp).sum(-1)).cpu().numpy()

    def _window_entropy(self, tokens: np.ndarray, start: int, context: int) -> np.ndarray:
        """Entropies after each token of ``tokens[start:start + context]`` (PAD-filled to ``context``)."""
        return self._run_windows([(tokens, start)], context, 1)[0, : len(tokens[start : start + context])]

    def _run_windows(self, windows: list[tuple[np.ndarray, int]], context: int, rows: int | None = None) -> np.ndarray:
        """(len(windows), context) entropies of the windows ``tokens[start:start + context]`` (PAD-filled),
        ``rows`` (default :data:`BATCH_ROWS` of the device) per forward."""
        rows = rows or BATCH_ROWS.get(torch.device(self.config.device).type, 64)
        out = np.empty((len(windows), context), dtype=np.float32)
        for a in range(0, len(windows), rows):
            x = np.full((min(rows, len(windows) - a), context), PAD, dtype=np.int64)
            for j, (tokens, start) in enumerate(windows[a : a + rows]):
                piece = tokens[start : start + context]
                x[j, : len(piece)] = piece
            out[a : a + len(x)] = self._rows_entropy(x)
        return out

    @staticmethod
    def owner(i: int, context: int, stride: int) -> int:
        """Start of the window that gives token i its entropy."""
        return 0 if i < context else (i - context + stride) // stride * stride

    @staticmethod
    def windows(n: int, context: int, stride: int, first: int = 0) -> list[tuple[int, int, int]]:
        """(start, lo, hi) per window that gives tokens ``first .. n - 1`` their entropy: positions
        ``start + lo .. start + hi - 1`` take theirs from the window starting at ``start`` (see :meth:`owner`)."""
        out, start = [], EntropySplitter.owner(first, context, stride)
        while True:
            lo = 0 if start == 0 else context - stride
            if start + lo >= n:
                return out
            out.append((start, max(lo, first - start), min(context, n - start)))
            start += stride

    @staticmethod
    def _tokens(data: bytes) -> np.ndarray:
        return np.concatenate([[BOS], np.frombuffer(data, dtype=np.uint8)]).astype(np.int64)

    def _compute(self, data: bytes) -> np.ndarray:
        return self.batch_entropies([data])[0]

    def batch_entropies(self, documents: list[bytes], rows: int | None = None) -> list[np.ndarray]:
        """:meth:`entropies` of each document (equal up to float rounding), the windows of all the
        documents run ``rows`` at a time (default :data:`BATCH_ROWS` of the device) through the model."""
        context, stride = self.window()
        tokens = [self._tokens(d) for d in documents]
        jobs = [(d, *w) for d, t in enumerate(tokens) for w in self.windows(len(t), context, stride)]
        values = self._run_windows([(tokens[d], start) for d, start, _, _ in jobs], context, rows)
        outs = [np.empty(len(t), dtype=np.float32) for t in tokens]
        for j, (d, start, lo, hi) in enumerate(jobs):
            outs[d][start + lo : start + hi] = values[j, lo:hi]
        return outs

    def for_documents(self, documents: list[bytes]) -> list[Splitter]:
        if self.config.cache_dir is not None:  # cached entropies are read per document
            return super().for_documents(documents)
        return [_FixedEntropies(self, values) for values in self.batch_entropies(documents)]

    def entropies(self, data: bytes) -> np.ndarray:
        """(len(data) + 1,) float32: ``[i]`` is the next-byte entropy after token i of BOS + data."""
        if self.config.cache_dir is None:
            return self._compute(data)
        path = Path(self.config.cache_dir) / f"{self._cache_key(data)}.npy"
        if path.is_file():
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError):  # a damaged or foreign file: computed again below
                pass
        values = self._compute(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, values)
        os.replace(tmp, path)
        return values

    def _cache_key(self, data: bytes) -> str:
        digest = hashlib.sha256(_digest(_stamp(Path(self.config.checkpoint))).encode())
        digest.update(repr(self.window()).encode())
        digest.update(data)
        return digest.hexdigest()

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        if not data:
            return np.zeros(0, dtype=bool)
        return self.rules(self.entropies(data), parent)

    def rules(self, entropy: np.ndarray, parent: np.ndarray, since: int = 0) -> np.ndarray:
        """Boundaries from a document's entropies (see :func:`entropy_boundaries`)."""
        return self._rules(entropy, parent, since)[0]

    def _rules(self, entropy: np.ndarray, parent: np.ndarray, since: int) -> tuple[np.ndarray, int]:
        cfg = self.config
        return patch_ends(entropy, parent, cfg.global_threshold(), cfg.relative_threshold, cfg.max_patch, since)

    def scan(self) -> EntropyScan:
        return EntropyScan(self)

    def start(self) -> EntropyState:
        return EntropyState(self)


class EntropyScan:
    """The document's newest ``context`` tokens (token ``first`` on), the entropy after the last
    one and the open patch's length; each chunk runs the windows owning its positions in batches."""

    def __init__(self, splitter: EntropySplitter) -> None:
        self.splitter = splitter
        self.context, self.stride = splitter.window()
        self.tokens, self.first = np.array([BOS], dtype=np.int64), 0
        self.last: float | None = None  # entropy after the last token fed
        self.since = 0

    def feed(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        if not len(data):
            return np.zeros(0, dtype=bool)
        seen = self.first + len(self.tokens)  # tokens of BOS + data so far
        self.tokens = np.concatenate([self.tokens, np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64)])
        n = seen + len(data)
        lo = seen if self.last is not None else 0  # the entropy after BOS is computed with the first byte
        entropy = np.empty(n - lo, dtype=np.float32)
        wanted = self.splitter.windows(n, self.context, self.stride, lo)
        values = self.splitter._run_windows([(self.tokens, start - self.first) for start, _, _ in wanted], self.context)
        for (start, a, b), row in zip(wanted, values):
            entropy[start + a - lo : start + b - lo] = row[a:b]
        if self.last is not None:
            entropy = np.concatenate([[self.last], entropy])
        self.last = float(entropy[-1])
        out, self.since = self.splitter._rules(entropy, parent, self.since)
        keep = max(0, n - self.context)  # every later window starts at or after this token
        self.tokens, self.first = self.tokens[keep - self.first :], keep
        return out


class _FixedEntropies(Splitter):
    """An entropy splitter for one document whose entropies were computed in a batch."""

    def __init__(self, splitter: EntropySplitter, entropy: np.ndarray) -> None:
        super().__init__(splitter.config)
        self.splitter, self.entropy = splitter, entropy

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        if not data:
            return np.zeros(0, dtype=bool)
        return self.splitter.rules(self.entropy, parent)


class EntropyState:
    """The newest tokens of the document (at most 2 * context). Each byte runs the entropy model
    once, over the window that owns the new position (O(context) per byte), and applies the
    rules of :func:`entropy_boundaries`."""

    def __init__(self, splitter: EntropySplitter) -> None:
        self.splitter = splitter
        self.recent = [BOS]  # tokens first, first + 1, ... of BOS + data
        self.first = 0
        self.last: float | None = None  # entropy after the previous token
        self.since = 0  # parent positions in the open patch

    def push(self, byte: int, parent: bool) -> bool:
        sp, cfg = self.splitter, self.splitter.config
        context, stride = sp.window()
        self.recent.append(byte)
        i = self.first + len(self.recent) - 1
        if len(self.recent) > 2 * context:
            drop = len(self.recent) - context
            del self.recent[:drop]
            self.first += drop
        start = sp.owner(i, context, stride)
        values = sp._window_entropy(np.array(self.recent[start - self.first :], dtype=np.int64), 0, context)
        before = float(values[i - 1 - start]) if self.last is None else self.last
        after = self.last = float(values[i - start])
        if not parent:
            return False
        threshold = cfg.global_threshold()
        fire = (threshold is None or after > threshold) and (
            cfg.relative_threshold is None or after - before > cfg.relative_threshold
        )
        self.since += 1
        if fire or self.since == cfg.max_patch:
            self.since = 0
            return True
        return False
