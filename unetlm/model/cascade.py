"""Cascaded step-by-step inference: a deeper stage runs only when its splitter fires.

A :class:`Cascade` holds one document per row of a batch. ``prefill(rows)`` feeds each row's
first tokens at once (one full forward, each part run by its ``prefill``); ``step(tokens)``
takes the next token of each row. Both return the logits :meth:`UNet.forward` gives at that
position (the full forward is the reference; tests check equality at every position). Per byte:

    embed -> stage-0 encoder step; the splitter of each transition decides whether the next
    stage gets a position (byte-level splitters on the host before the step, learned ones from
    the encoder output); for each stage s+1 that fires: pool, stage s+1 encoder step, and so
    on; the deepest stage that fired runs its middle step; then, from the deepest stage that
    ran up to stage 0: the upsampler takes the coarse stage's new output (where it fired; a
    learned splitter smooths it first), gives the vector at the offset since the newest
    boundary, the skip is added, decoder step; final norm; head.

Every part follows the step protocol of :mod:`unetlm.core.step`; its state lives in
``Cascade.state`` under the keys of :meth:`UNet.init_state`. Rows that do not advance keep their
state: :meth:`Cascade._advance` is the one place that selects rows. A stage holding ``max_len``
positions drops further boundaries exactly as :func:`~unetlm.core.layout.link` does: finer
positions keep reading its last kept vector. A row holds at most ``seq_len`` tokens (the full
forward refuses more); :mod:`unetlm.model.generate` decides what to drop.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from unetlm.core.step import LinkStep, StepInfo, keep_rows
from unetlm.core.tokens import BOS, PAD, documents_from_tokens
from unetlm.mixers.base import Mixer
from unetlm.poolers.base import Pooler
from unetlm.splitters.base import LearnedSplitter, Splitter
from unetlm.upsamplers.base import Upsampler

# kind -> (base class, methods a class must override)
_STEP_API = {
    "mixer": (Mixer, ("init_state", "step")),
    "pooler": (Pooler, ("init_state", "step")),
    "upsampler": (Upsampler, ("init_state", "step")),
    "splitter": (Splitter, ("start",)),
    "learned splitter": (LearnedSplitter, ("init_state", "step")),
}


def missing_step_api(model) -> list[str]:
    """One line per component of ``model`` lacking the step protocol (empty: cached generation works)."""
    n = len(model.spec.stages)
    problems, reported = [], set()
    byte_splitters = iter(model.splitters)
    for i, stage in enumerate(model.spec.stages):
        blocks = list(model.middle.blocks) if i == n - 1 else [*model.encoders[i].blocks, *model.decoders[i].blocks]
        parts = [("mixer", "mixer", block) for block in blocks]
        if i > 0:
            learned = model.learned[i - 1]
            splitter = ("learned splitter", learned) if learned is not None else ("splitter", next(byte_splitters))
            parts += [(*splitter[:1], "splitter", splitter[1]), ("pooler", "pooler", model.poolers[i - 1]),
                      ("upsampler", "upsampler", model.upsamplers[i - 1])]
        for kind, key, part in parts:
            cls = type(part)
            base, methods = _STEP_API[kind]
            lacking = [m for m in methods if getattr(cls, m) is getattr(base, m)]
            if lacking and (kind, cls) not in reported:
                reported.add((kind, cls))
                problems.append(
                    f"stage {i} {kind} {getattr(stage, key).name!r} ({cls.__module__}.{cls.__qualname__}) "
                    f"does not implement {', '.join(lacking)}"
                )
    return problems


def check_step_api(model) -> None:
    problems = missing_step_api(model)
    if problems:
        raise NotImplementedError(
            "cached generation needs the step protocol of every component: "
            + "; ".join(problems)
            + " (generate with cached=False to recompute the whole context at each byte)"
        )


def stage_counts(model, tokens: torch.Tensor, demand: bool = False) -> list[int]:
    """Positions each stage holds for one row of tokens (T,) in the full forward's layout
    (``demand``: plus the boundaries it dropped for want of slots)."""
    row = tokens[None]
    if len(model.learned_splitters):  # boundaries exist only inside the forward
        with torch.no_grad():
            out = model(row)
        held, dropped = out.positions, out.truncated
    else:
        doc = documents_from_tokens(row)
        links = model.links(row, doc, model.split(row, doc))
        held, dropped = [link.coarse.valid.sum(1) for link in links], [link.truncated for link in links]
    return [row.shape[1]] + [int(n[0]) + (int(d[0]) if demand else 0) for n, d in zip(held, dropped)]


class Cascade:
    """Step-by-step state of a :class:`~unetlm.model.unet.UNet` for ``batch`` documents."""

    @torch.no_grad()
    def __init__(self, model, batch: int = 1) -> None:
        check_step_api(model)
        self.model = model
        self.batch = batch
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = list(model.lengths)
        n = self.n_stages = len(self.max_len)
        self.vocab_size = model.spec.vocab_size
        self.count = np.zeros((n, batch), dtype=np.int64)  # positions held per stage and row
        self.dropped = np.zeros((n, batch), dtype=np.int64)  # boundaries dropped: the stage was full
        self.ran = np.zeros(n, dtype=np.int64)  # row-steps on which each stage ran
        self.row_steps = 0
        self.splitters = [[s.start() for s in model.splitters] for _ in range(batch)]
        # the embedding reads the newest `span` tokens of the row (hashed n-grams); older: absent
        span = max(model.embed.spec.hash_ngrams, default=1)
        self.recent = np.full((batch, span), PAD, dtype=np.int64)
        self.recent_doc = np.full((batch, span), -1, dtype=np.int64)
        self.state = model.init_state(batch, self.device, self.dtype)
        # per transition s: the fine index of the newest kept coarse boundary (-1: none yet)
        self.boundary = np.full((max(n - 1, 0), batch), -1, dtype=np.int64)

    @property
    def firing_rates(self) -> list[float]:
        """Per stage, the fraction of row-steps on which it ran (stage 0: 1.0)."""
        return [float(r) / max(self.row_steps, 1) for r in self.ran]

    def _check_token(self, b: int, tok: int, first: bool) -> None:
        if tok == BOS:
            if not first:
                raise ValueError(f"row {b}: BOS may only start a row (one document per row)")
        elif not (0 <= tok < 256 or (self.n_stages == 1 and PAD < tok < self.vocab_size)):  # one stage: any token
            raise ValueError(f"row {b}: token {tok} is not a byte, BOS or a token of the vocabulary")

    def _push_bytes(self, b: int, tok: int) -> list[bool]:
        """The byte-level splitters' marks at row b's next token (BOS: a boundary everywhere)."""
        if tok == BOS:
            return [True] * len(self.splitters[b])
        if not 0 <= tok < 256:
            return []
        marks, parent = [], True
        for state in self.splitters[b]:
            parent = bool(state.push(tok, parent)) and parent
            marks.append(parent)
        return marks

    def decide(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        """(n_stages, B) bool: which stages get a position at this step, as far as byte-level
        splitters decide (host side); stages after a learned splitter are decided in :meth:`step`."""
        fire = np.zeros((self.n_stages, self.batch), dtype=bool)
        for b in np.flatnonzero(active):
            tok = int(tokens[b])
            if self.count[0, b] >= self.max_len[0]:
                raise ValueError(f"row {b} already holds model.seq_len = {self.max_len[0]} tokens")
            self._check_token(b, tok, first=self.count[0, b] == 0)
            fire[0, b] = on = True
            for s, mark in enumerate(self._push_bytes(b, tok), start=1):
                on = on and mark
                if on and self.count[s, b] >= self.max_len[s]:
                    self.dropped[s, b] += 1
                    on = False
                fire[s, b] = on
        return fire

    def _stage_step(self, s: int, fire: np.ndarray) -> StepInfo:
        pos = np.where(fire, self.count[s], np.minimum(self.count[s], self.max_len[s] - 1))  # in range
        return StepInfo.at(pos, fire, self.device)

    def _link_step(self, s: int, fine: StepInfo, fire: np.ndarray) -> LinkStep:
        """Transition s at this step; records the new boundary where the coarse stage fires."""
        self.boundary[s] = np.where(fire, self.count[s], self.boundary[s])
        offset = np.where(self.boundary[s] >= 0, self.count[s] - self.boundary[s], self.count[s])
        return LinkStep(
            fine=fine,
            fire=torch.from_numpy(fire.copy()).to(self.device),
            any_fire=bool(fire.any()),
            offset=torch.from_numpy(offset).to(self.device),
        )

    def _advance(self, key: tuple, step, x, info, write: np.ndarray):
        """``step(x, state, info)`` on the state under ``key``; rows not in ``write`` keep their state."""
        old = self.state[key]
        out, new = step(x, old, info)
        if not write.all():
            new = keep_rows(torch.from_numpy(write.copy()).to(self.device), new, old)
        self.state[key] = new
        return out

    def _embed(self, tokens: np.ndarray, active: np.ndarray) -> torch.Tensor:
        """(B, d0): the embedding of each row's new token, from its newest ``span`` tokens."""
        self.recent[active] = np.concatenate([self.recent[active, 1:], tokens[active, None]], axis=1)
        self.recent_doc[active] = np.concatenate([self.recent_doc[active, 1:], self.recent_doc[active, :1] * 0], 1)
        window = torch.from_numpy(self.recent).to(self.device)
        return self.model.embed(window, torch.from_numpy(self.recent_doc).to(self.device))[:, -1]

    @torch.no_grad()
    def step(self, tokens, active=None) -> torch.Tensor:
        """tokens: B ints (a byte, or BOS as a row's first token); active: B bools (default all).
        -> logits (B, VOCAB) at the new positions (rows not active: meaningless)."""
        model = self.model
        tokens = np.asarray(tokens, dtype=np.int64).reshape(self.batch)
        active = np.ones(self.batch, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        if not active.any():
            raise ValueError("no active row to step")
        fire = self.decide(tokens, active)
        n, top = self.n_stages, 0

        h = self._embed(tokens, active)
        skips, links = [], []
        for s in range(n - 1):  # down: encoders of the stages that get a position
            info = self._stage_step(s, fire[s])
            h = self._advance(("encoder", s), model.encoders[s].step, h, info, fire[s])
            skips.append(h)
            splitter = model.learned[s]
            if splitter is not None:
                chunk = self._advance(("splitter", s), splitter.step, h, info, fire[s])
                marked = fire[s] & chunk.boundary.cpu().numpy()
                full = self.count[s + 1] >= self.max_len[s + 1]
                self.dropped[s + 1] += marked & full
                fire[s + 1] = marked & ~full
            link = self._link_step(s, info, fire[s + 1])
            links.append(link)
            pooled = self._advance(("pooler", s), model.poolers[s].step, h, link, fire[s])
            if not link.any_fire:
                break
            h, top = pooled, s + 1
        coarse = None  # the new output of stage s + 1 (meaningful on rows where it fired)
        if top == n - 1:
            coarse = h = self._advance(("middle",), model.middle.step, h, self._stage_step(top, fire[top]), fire[top])
        for s in range(min(top, n - 2), -1, -1):  # up: decoders of the stages that ran
            link, splitter = links[s], model.learned[s]
            if coarse is not None and splitter is not None:
                smooth = lambda x, state, _: splitter.smooth_step(x, state)  # noqa: E731
                coarse = self._advance(("splitter", s), smooth, coarse, None, fire[s + 1])
            upsample = lambda x, state, lk: model.upsamplers[s].step(x, state, lk, fine=skips[s])  # noqa: E731
            up = self._advance(("upsampler", s), upsample, coarse, link, fire[s])
            coarse = h = self._advance(("decoder", s), model.decoders[s].step, skips[s] + up, link.fine, fire[s])
        logits = model.head(model.norm(h))
        self.count += fire
        self.ran += fire.sum(axis=1)
        self.row_steps += int(active.sum())
        return logits

    @torch.no_grad()
    def prefill(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Feed each row's tokens at once into a fresh cascade (B rows; BOS only first) -> logits
        (B, VOCAB) at each row's last token (rows without tokens: meaningless). One full forward
        pass, each part run by its ``prefill``; the state equals that of stepping the tokens."""
        if self.row_steps:
            raise ValueError("prefill needs a fresh cascade")
        if len(rows) != self.batch:
            raise ValueError(f"prefill got {len(rows)} rows for a batch of {self.batch}")
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        if lengths.max(initial=0) > self.max_len[0]:
            raise ValueError(f"a row of {lengths.max()} tokens exceeds model.seq_len = {self.max_len[0]}")
        tokens = np.full((self.batch, max(int(lengths.max(initial=0)), 1)), PAD, dtype=np.int64)
        for b, row in enumerate(rows):
            for t, tok in enumerate(row):
                self._check_token(b, int(tok), first=t == 0)
                self._push_bytes(b, int(tok))
            tokens[b, : len(row)] = row
            span = self.recent.shape[1]
            tail = list(row)[-span:]
            if tail:
                self.recent[b, -len(tail):], self.recent_doc[b, -len(tail):] = tail, 0
        out = self.model(torch.from_numpy(tokens).to(self.device), cache=self.state)
        links = self.state.pop("links")
        self.count[0] = lengths
        for s, link in enumerate(links):
            self.count[s + 1] = link.coarse.valid.sum(1).cpu().numpy()
            self.dropped[s + 1] = link.truncated.cpu().numpy()
            last = torch.from_numpy(np.maximum(lengths - 1, 0)).to(self.device)[:, None]
            seg = link.fine_seg.gather(1, last).squeeze(1).cpu().numpy()
            offset = link.fine_offset.gather(1, last).squeeze(1).cpu().numpy()
            self.boundary[s] = np.where(seg > 0, self.count[s] - 1 - offset, -1)
            lengths = self.count[s + 1]
        self.ran += self.count.sum(axis=1)
        self.row_steps += int(self.count[0].sum())
        index = torch.from_numpy(np.maximum(self.count[0] - 1, 0)).to(self.device)
        return out.logits[torch.arange(self.batch, device=self.device), index]
