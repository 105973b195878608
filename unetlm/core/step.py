"""What a component's ``step`` learns about the one new position it handles (cached generation).

Every component kind follows one protocol, mirroring ``forward``:

* ``init_state(batch, max_len, device, dtype)``: the state before any position (``max_len``:
  the most positions the stage will hold);
* ``step(x, state, info) -> (out, state)``: one new position per row, equal to ``forward``
  there; ``info`` is a :class:`StepInfo` (mixers, learned splitters) or a :class:`LinkStep`
  (poolers, upsamplers);
* ``prefill(x, state, info) -> (out, state)``: ``state`` fresh from ``init_state``, ``x`` and
  ``info`` what ``forward`` takes; returns ``forward``'s output and the state that ``step``
  calls over the same positions would have reached (after each row's last valid position).

A row whose ``write`` is False does not advance: the caller keeps its old state, so ``step`` may
compute every row; only a component that updates a tensor in place must leave such rows as they are.
"""
from __future__ import annotations

from typing import Iterator

import attrs
import numpy as np
import torch

from unetlm.core.layout import Link, StageInfo


@attrs.frozen
class StepInfo:
    """The new position of every row at one step of a stage."""

    pos: torch.Tensor  # (B,) long: its index in the stage (0, 1, ...)
    write: torch.Tensor  # (B,) bool: rows that advance; the others' outputs are ignored
    length: int  # 1 + the largest pos of a writing row: cache slots beyond it are empty
    all_write: bool  # every row advances
    uniform: bool  # every row advances, all at the same pos: every cached key is visible

    @staticmethod
    def at(pos: np.ndarray, write: np.ndarray, device) -> StepInfo:
        """From host arrays: positions (B,) long and the advancing rows (B,) bool."""
        written = pos[write]
        all_write = bool(write.all())
        return StepInfo(
            pos=torch.from_numpy(pos.copy()).to(device),
            write=torch.from_numpy(write.copy()).to(device),
            length=int(written.max()) + 1 if written.size else 1,
            all_write=all_write,
            uniform=all_write and bool((pos == pos[0]).all()),
        )


@attrs.frozen
class LinkStep:
    """One step of a stage transition, seen from its new fine position."""

    fine: StepInfo  # the new fine position (``fine.write``: rows where the fine stage advances)
    fire: torch.Tensor  # (B,) bool: the position is a kept boundary, the coarse stage gets a position
    any_fire: bool
    offset: torch.Tensor  # (B,) long: fine steps since the newest coarse boundary (0 where ``fire``;
    # before any boundary: the fine position's own index)


def stage_steps(info: StageInfo) -> Iterator[StepInfo]:
    """The :class:`StepInfo` of each position of a full-forward stage, in order (for prefills
    written as a loop of steps)."""
    valid = info.valid.cpu().numpy()
    B, L = valid.shape
    for t in range(L):
        yield StepInfo.at(np.full(B, t, dtype=np.int64), valid[:, t], info.valid.device)


def link_steps(link: Link) -> Iterator[LinkStep]:
    """The :class:`LinkStep` of each fine position of a full-forward transition, in order."""
    Lc = link.coarse_src.shape[1]
    kept = link.fine_is_boundary & (link.fine_is_boundary.long().cumsum(1) <= Lc)
    for t, fine in enumerate(stage_steps(link.fine)):
        fire = kept[:, t] & fine.write
        yield LinkStep(fine=fine, fire=fire, any_fire=bool(fire.any()), offset=link.fine_offset[:, t])


def at_last(x: torch.Tensor, info: StageInfo) -> torch.Tensor:
    """x (B, L, ...) at each row's last valid position -> (B, ...) (valid positions form a prefix;
    a row without one gives position 0)."""
    last = (info.valid.sum(1) - 1).clamp(min=0)
    return x[torch.arange(x.shape[0], device=x.device), last]


def keep_rows(write: torch.Tensor, new, old):
    """State ``new`` on rows where ``write`` (B,), ``old`` elsewhere; recurses through tuples
    (named ones too), lists and dicts. The same object, or ``None`` as ``new``, is kept as is;
    an ``old`` of ``None`` stands for zeros."""
    if new is old or new is None:
        return new
    if isinstance(new, torch.Tensor):
        old = torch.zeros_like(new) if old is None else old
        return torch.where(write.view(-1, *([1] * (new.dim() - 1))), new, old)
    if isinstance(new, tuple):
        merged = [keep_rows(write, a, b) for a, b in zip(new, old)]
        return type(new)(*merged) if hasattr(new, "_fields") else tuple(merged)
    if isinstance(new, list):
        return [keep_rows(write, a, b) for a, b in zip(new, old)]
    if isinstance(new, dict):
        return {key: keep_rows(write, value, old[key]) for key, value in new.items()}
    return new


def prefill_by_steps(step, state, inputs, steps):
    """Run ``step(x_t, state, info_t) -> (out, state)`` over the positions of a prefill, keeping
    the state of rows that do not advance; -> the final state (the fallback ``prefill``)."""
    for x, info in zip(inputs, steps):
        write = info.write if isinstance(info, StepInfo) else info.fine.write
        _, new = step(x, state, info)
        state = new if bool(write.all()) else keep_rows(write, new, state)
    return state
