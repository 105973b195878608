"""Cascaded step-by-step inference: a deeper stage runs only when its splitter fires.

A :class:`Cascade` holds one document per row of a batch. ``step(tokens)`` takes the next
token of each row and returns the logits :meth:`UNet.forward` gives at that position (the
full forward is the reference; tests check equality at every position). Per byte:

    embed -> stage-0 encoder step; the splitters decide which deeper stages get a position;
    for each stage s+1 that fires: pool (select: the fine vector; mean: the open segment),
    stage s+1 encoder step, and so on; the deepest stage that fired runs its middle step;
    then, from the deepest stage that ran up to stage 0: upsample that stage's latest coarse
    decoder output (or the start vector before the first boundary) at the offset since its
    boundary, add the skip, decoder step; final norm; head.

Every stage keeps its own mixer caches and, per transition, an upsampler state holding the
coarse outputs so far (or the start vector), the newest one's boundary and whether one exists. A stage holding
``max_len`` positions drops further boundaries exactly as :func:`~unetlm.core.layout.link`
does: finer positions keep reading its last kept vector. A row holds at most ``seq_len``
tokens (the full forward refuses more); :mod:`unetlm.model.generate` decides what to drop.
"""
from __future__ import annotations

import numpy as np
import torch

from unetlm.mixers.base import Mixer, StepInfo
from unetlm.core.tokens import BOS, PAD, documents_from_tokens
from unetlm.poolers.base import Pooler
from unetlm.splitters.base import Splitter
from unetlm.upsamplers.base import Upsampler

# kind -> (base class, alternative sets of methods a class must override)
_STEP_API = {
    "mixer": (Mixer, [("init_state", "step")]),
    "pooler": (Pooler, [("init_state", "step")]),
    "upsampler": (Upsampler, [("prepare", "step"), ("init_state", "push", "step")]),
    "splitter": (Splitter, [("start",)]),
}


def missing_step_api(model) -> list[str]:
    """One line per component of ``model`` lacking the step API (empty: cached generation works)."""
    n = len(model.spec.stages)
    problems = []
    for i, stage in enumerate(model.spec.stages):
        blocks = list(model.middle.blocks) if i == n - 1 else [*model.encoders[i].blocks, *model.decoders[i].blocks]
        parts = [("mixer", block) for block in blocks]
        if i > len(model.splitters):
            problems.append(
                f"stage {i} splitter {stage.splitter.name!r} is learned (it decides inside the forward); "
                "cached generation does not support learned splitters"
            )
        elif i > 0:
            parts += [("splitter", model.splitters[i - 1])]
        if i > 0:
            parts += [("pooler", model.poolers[i - 1]), ("upsampler", model.upsamplers[i - 1])]
        reported = set()
        for kind, part in parts:
            cls = type(part)
            base, options = _STEP_API[kind]
            lacking = min(([m for m in ms if getattr(cls, m) is getattr(base, m)] for ms in options), key=len)
            if lacking and (kind, cls) not in reported:
                reported.add((kind, cls))
                problems.append(
                    f"stage {i} {kind} {getattr(stage, kind).name!r} ({cls.__module__}.{cls.__qualname__}) "
                    f"does not implement {', '.join(lacking)}"
                )
    return problems


def check_step_api(model) -> None:
    problems = missing_step_api(model)
    if problems:
        raise NotImplementedError(
            "cached generation needs the step API of every component: "
            + "; ".join(problems)
            + " (generate with cached=False to recompute the whole context at each byte)"
        )


def stage_counts(model, tokens: torch.Tensor) -> list[int]:
    """Positions each stage holds for one row of tokens (T,) in the full forward's layout."""
    row = tokens[None]
    if len(model.learned_splitters):  # boundaries exist only inside the forward
        with torch.no_grad():
            return [row.shape[1]] + [int(n[0]) for n in model(row).positions]
    doc = documents_from_tokens(row)
    links = model.links(row, doc, model.split(row, doc))
    return [row.shape[1]] + [int(link.coarse.valid.sum()) for link in links]


def _keep_rows(write: torch.Tensor, new, old):
    """State ``new`` where ``write`` (B,), ``old`` elsewhere; recurses through tuples, lists and dicts."""
    if isinstance(new, torch.Tensor):
        return torch.where(write.view(-1, *([1] * (new.dim() - 1))), new, old)
    if isinstance(new, tuple):
        merged = [_keep_rows(write, a, b) for a, b in zip(new, old)]
        return type(new)(*merged) if hasattr(new, "_fields") else tuple(merged)
    if isinstance(new, list):
        return [_keep_rows(write, a, b) for a, b in zip(new, old)]
    if isinstance(new, dict):
        return {key: _keep_rows(write, value, old[key]) for key, value in new.items()}
    return new


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
        self.ran = np.zeros(n, dtype=np.int64)  # row-steps on which each stage ran
        self.row_steps = 0
        self.splitters = [[s.start() for s in model.splitters] for _ in range(batch)]
        # the embedding reads the newest `span` tokens of the row (hashed n-grams); older: absent
        span = max(model.embed.spec.hash_ngrams, default=1)
        self.recent = np.full((batch, span), PAD, dtype=np.int64)
        self.recent_doc = np.full((batch, span), -1, dtype=np.int64)

        def caches(stack, max_len):
            return [b.init_state(batch, max_len, self.device, self.dtype) for b in stack.blocks]

        self.enc = [caches(model.encoders[s], self.max_len[s]) for s in range(n - 1)]
        self.dec = [caches(model.decoders[s], self.max_len[s]) for s in range(n - 1)]
        self.mid = caches(model.middle, self.max_len[-1])
        self.pool = [p.init_state(batch, self.device, self.dtype) for p in model.poolers]
        # per transition s (fine stage s, coarse stage s+1): the coarse outputs so far
        self.up = [u.init_state(batch, self.device, self.dtype) for u in model.upsamplers]
        self.has_coarse = np.zeros((max(n - 1, 0), batch), dtype=bool)
        self.boundary = np.zeros((max(n - 1, 0), batch), dtype=np.int64)  # its fine index

    @property
    def firing_rates(self) -> list[float]:
        """Per stage, the fraction of row-steps on which it ran (stage 0: 1.0)."""
        return [float(r) / max(self.row_steps, 1) for r in self.ran]

    def decide(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        """(n_stages, B) bool: which stages get a position at this step (host side)."""
        n = self.n_stages
        fire = np.zeros((n, self.batch), dtype=bool)
        for b in np.flatnonzero(active):
            tok = int(tokens[b])
            if self.count[0, b] >= self.max_len[0]:
                raise ValueError(f"row {b} already holds model.seq_len = {self.max_len[0]} tokens")
            if tok == BOS:
                if self.count[0, b] > 0:
                    raise ValueError(f"row {b}: BOS may only start a row (one document per row)")
                marks = [True] * (n - 1)
            elif 0 <= tok < 256 or (n == 1 and PAD < tok < self.vocab_size):  # one stage: any token
                marks, parent = [], True
                for state in self.splitters[b]:
                    parent = bool(state.push(tok, parent)) and parent
                    marks.append(parent)
            else:
                raise ValueError(f"row {b}: token {tok} is not a byte, BOS or a token of the vocabulary")
            fire[0, b] = on = True
            for s in range(1, n):
                on = on and marks[s - 1] and self.count[s, b] < self.max_len[s]
                fire[s, b] = on
        return fire

    def _info(self, s: int, fire: np.ndarray) -> dict:
        pos = np.where(fire, self.count[s], np.minimum(self.count[s], self.max_len[s] - 1))  # in range
        info = StepInfo(
            pos=torch.from_numpy(pos.copy()).to(self.device),
            write=torch.from_numpy(fire.copy()).to(self.device),
            length=int(pos[fire].max()) + 1,
            all_write=bool(fire.all()),
            uniform=bool(fire.all() and (pos == pos[0]).all()),
        )
        return {"step": info}

    def _embed(self, tokens: np.ndarray, active: np.ndarray) -> torch.Tensor:
        """(B, d0): the embedding of each row's new token, from its newest ``span`` tokens."""
        self.recent[active] = np.concatenate([self.recent[active, 1:], tokens[active, None]], axis=1)
        self.recent_doc[active] = np.concatenate([self.recent_doc[active, 1:], self.recent_doc[active, :1] * 0], 1)
        window = torch.from_numpy(self.recent).to(self.device)
        return self.model.embed(window, torch.from_numpy(self.recent_doc).to(self.device))[:, -1]

    @staticmethod
    def _run(blocks, states: list, h: torch.Tensor, memo: dict) -> torch.Tensor:
        info: StepInfo = memo["step"]
        for i, block in enumerate(blocks):
            h, new = block.step(h, states[i], memo)
            if new is not states[i] and not info.all_write:
                new = _keep_rows(info.write, new, states[i])
            states[i] = new
        return h

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
        ran = fire.any(axis=1)
        n, top = self.n_stages, int(np.flatnonzero(ran).max())
        memos = [self._info(s, fire[s]) if ran[s] else None for s in range(n)]
        fire_t = [torch.from_numpy(f.copy()).to(self.device) for f in fire]

        h = self._embed(tokens, active)
        skips = []
        for s in range(min(top + 1, n - 1)):  # encoders of the stages that ran
            h = self._run(model.encoders[s].blocks, self.enc[s], h, memos[s])
            skips.append(h)
            coarse_fire = fire_t[s + 1] if ran[s + 1] else None
            pooled, self.pool[s] = model.poolers[s].step(h, self.pool[s], fire_t[s], coarse_fire)
            if pooled is not None:
                h = pooled
        if top == n - 1:
            h = self._run(model.middle.blocks, self.mid, h, memos[top])
        for s in range(top, -1, -1):  # h becomes stage s's output (meaningful on its firing rows)
            if s < n - 1:
                offset = np.where(self.has_coarse[s], self.count[s] - self.boundary[s], self.count[s])
                u = model.upsamplers[s].step(self.up[s], torch.from_numpy(offset).to(self.device), skips[s])
                h = self._run(model.decoders[s].blocks, self.dec[s], skips[s] + u, memos[s])
            if s > 0:  # stage s hands its new output to the finer stage's upsampler
                self.up[s - 1] = model.upsamplers[s - 1].push(h, self.up[s - 1], fire_t[s])
                self.boundary[s - 1] = np.where(fire[s], self.count[s - 1], self.boundary[s - 1])
                self.has_coarse[s - 1] |= fire[s]
        logits = model.head(model.norm(h))
        self.count += fire
        self.ran += fire.sum(axis=1)
        self.row_steps += int(active.sum())
        return logits
