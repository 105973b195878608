"""When a run saves and when it stops early: signals, the checkpoint schedule, and the agreement
of every rank on both at each step boundary.

SIGTERM (a scheduler's preemption or time limit), SIGUSR1 (Slurm's ``--signal=USR1@SECONDS``
warning) and SIGINT (Ctrl-C) on any rank only set a flag. At the next step boundary the ranks
agree (one all-reduce of two numbers over the host-side gloo group, every step: it does not wait
for the device's queued work, and a stop is honoured within one step when a grace period is
short), write a checkpoint at that step and the run exits with :data:`INTERRUPTED`. A save is
never cut short by the first signal. A second signal, more than :data:`REPEAT_WINDOW_S` after the
first, ends the process at once (status 128 + the signal's number) without a checkpoint; the last
committed checkpoint stays valid (checkpoints are written aside and renamed). Within the window a
repeat is the same request delivered twice: Slurm signals every process of a step, and torchrun's
agent forwards what it receives to its workers.

Checkpoints are due every ``training.checkpoint_every`` steps, at the last step, on a stop, and
when ``training.checkpoint_every_minutes`` have passed on rank 0's clock since the last one
(rank 0 decides, the all-reduce shares it: every rank saves at the same step).
"""
from __future__ import annotations

import os
import signal
import threading
import time

import attrs

from unetlm.recipe.schema import TrainingSpec
from unetlm.train.distributed import World, max_over_ranks

INTERRUPTED = 75  # EX_TEMPFAIL: interrupted, a checkpoint was saved; run the same command again
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW_S = 2.0


def _exit_now(status: int) -> None:
    os._exit(status)


class StopSignals:
    """Handlers of :data:`STOP_SIGNALS` while a run lives (``with StopSignals() as signals``);
    ``received`` is the first one's number (0: none). Installed only in the main thread (where
    Python delivers signals); elsewhere it stays empty and the previous handlers stay."""

    def __init__(self, clock=None) -> None:
        self.received = 0
        self._clock = clock or time.monotonic
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        now = self._clock()
        if not self.received:
            self.received, self._first = signum, now
        elif now - self._first > REPEAT_WINDOW_S:
            name = signal.Signals(signum).name
            os.write(2, f"\n{name} again: exiting now without a checkpoint (the last saved one is kept)\n".encode())
            _exit_now(128 + signum)


@attrs.frozen
class Boundary:
    """What every rank does at a step boundary: ``save`` a checkpoint, ``stop`` (by ``signal``)."""

    save: bool
    stop: bool
    signal: str = ""


class CheckpointSchedule:
    """Decides, identically on every rank, whether to save and whether to stop after a step."""

    def __init__(self, spec: TrainingSpec, world: World, signals: StopSignals, saved_step: int, clock=None) -> None:
        self.every = spec.checkpoint_every
        self.seconds = spec.checkpoint_every_minutes * 60.0
        self.world = world
        self.signals = signals
        self.saved_step = saved_step  # the step of the run directory's checkpoint (0: none)
        self._clock = clock or time.monotonic
        self._saved_at = self._clock()

    def at(self, step: int, last: int) -> Boundary:
        """The decision after ``step`` (collective: every rank calls it at every boundary);
        ``last``: the step this invocation ends at."""
        timed = self.world.main and self.seconds > 0 and self._clock() - self._saved_at >= self.seconds
        received, timed = max_over_ranks([float(self.signals.received), float(timed)], self.world)
        stop = received > 0
        due = step % self.every == 0 or step == last or timed > 0 or stop
        return Boundary(due and step > self.saved_step, stop, signal.Signals(int(received)).name if stop else "")

    def saved(self, step: int) -> None:
        self.saved_step = step
        self._saved_at = self._clock()
