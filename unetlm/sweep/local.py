"""The local executor: a sweep's unfinished runs on this machine, ``parallel`` at once.

Each run is its training command (:mod:`unetlm.sweep.command`) in a process of its own, its output
in ``logs/NAME.log``; one progress bar counts the sweep's steps. A run that fails is reported and
the others go on. Ctrl-C (or SIGTERM) stops the running runs, which save their checkpoints; the
same command continues them. With GPUs, each of the runs at once gets its own ``gpus`` devices.
"""
from __future__ import annotations

import os
import signal
import socket
import time

import attrs

from unetlm.data.corpora import prepare_cached
from unetlm.sweep.command import TrainProcess, node_command, train_args
from unetlm.sweep.directory import FINISHED, SweepDir
from unetlm.sweep.expand import Run
from unetlm.sweep.status import run_status
from unetlm.train.progress import Progress

POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 120.0


class SweepInterrupted(Exception):
    """Ctrl-C: the running runs were stopped (with their checkpoints); the same command continues."""


@attrs.define
class Outcome:
    done: list[str] = attrs.field(factory=list)
    failed: list[tuple[str, str]] = attrs.field(factory=list)  # (name, why)
    busy: list[str] = attrs.field(factory=list)  # still running from an earlier start: not started again


def wait_a_moment() -> None:
    time.sleep(POLL_SECONDS)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@attrs.define
class _Running:
    run: Run
    process: TrainProcess
    slot: int
    started: float


def run_local(sweep: SweepDir, parallel: int = 1, gpus: int = 0, progress: bool = True) -> Outcome:
    """Train every unfinished run of ``sweep``; returns which finished and which failed (and why)."""
    todo = [r for r in sweep.runs if not sweep.finished(r)]
    outcome = Outcome(done=[r.name for r in sweep.runs if r not in todo])
    live = [r for r in todo if run_status(sweep, r).state == "running"]  # e.g. a sweep whose terminal closed
    outcome.busy = [r.name for r in live]
    todo = [r for r in todo if r not in live]
    parallel = parallel or len(todo) or 1
    total = sum(r.steps for r in todo)
    bar = Progress(total, enabled=progress, unit="step", desc=f"{sweep.spec.name or 'sweep'}", log_every=max(1, total // 20))
    say = bar.write
    if outcome.done and progress:
        say(f"{len(outcome.done)} of {len(sweep.runs)} runs already finished")
    if live:
        say(f"still running from an earlier start, not started again: {', '.join(outcome.busy)}")
    if parallel > 1 and len(todo) > 1:
        prepare_data(todo, progress)
    running: list[_Running] = []
    counted = {r.name: 0 for r in todo}  # steps of each run seen so far
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while todo or running:
            while todo and len(running) < parallel:
                run = todo.pop(0)
                slot = min(set(range(parallel)) - {r.slot for r in running})
                running.append(_start(sweep, run, slot, gpus))
                say(f"{run.name}: started ({run.steps} steps; log {sweep.log(run.name)})")
            wait_a_moment()
            ended = False
            for entry in list(running):
                records = sweep.metrics(entry.run.name)
                counted[entry.run.name] = records[-1]["step"] if records else 0
                code = entry.process.poll()
                if code is not None:
                    running.remove(entry)
                    _finish(sweep, entry, code, outcome, say)
                    ended = True
            if ended or sum(counted.values()) != bar.step:
                bar.update(sum(counted.values()), running=len(running), failed=len(outcome.failed))
    except KeyboardInterrupt:
        say(f"interrupted: stopping {len(running)} run(s); they save their checkpoints (Ctrl-C again to kill them)")
        try:
            for entry in running:
                entry.process.stop()
            for entry in running:
                sweep.attempt_ended(entry.run.name, entry.process.stop_and_wait(STOP_GRACE_SECONDS))
        except KeyboardInterrupt:
            for entry in running:
                entry.process.kill()
                sweep.attempt_ended(entry.run.name, entry.process.wait(0.1))
        raise SweepInterrupted(
            f"interrupted: {len(outcome.done)} of {len(sweep.runs)} runs finished; run the same command again to "
            f"continue the others from their checkpoints"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    return outcome


def prepare_data(runs: list[Run], progress: bool) -> None:
    """Prepare the runs' sources into the data cache once per distinct cache entry, before runs
    started at the same time would each prepare the same entry."""
    from unetlm.data.prepared import cache_key

    entries = {}
    for run in runs:
        recipe = run.recipe()
        if not recipe.data.prepared_dirs:
            entries.setdefault(cache_key(recipe), recipe)
    for recipe in entries.values():
        prepare_cached(recipe, progress)


def _start(sweep: SweepDir, run: Run, slot: int, gpus: int) -> _Running:
    command = node_command(train_args(run, sweep.run_dir(run.name)), gpus)
    process = TrainProcess(command, sweep.log(run.name), env=_devices(slot, gpus))
    sweep.attempt_started(run.name, socket.gethostname(), process.pid)
    return _Running(run, process, slot, time.monotonic())


def _devices(slot: int, gpus: int) -> dict | None:
    """``CUDA_VISIBLE_DEVICES`` of the run in ``slot``: its own ``gpus`` of the visible devices."""
    if not gpus:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range((slot + 1) * gpus)]
    return {"CUDA_VISIBLE_DEVICES": ",".join(devices[slot * gpus : (slot + 1) * gpus])}


def _finish(sweep: SweepDir, entry: _Running, code: int, outcome: Outcome, say) -> None:
    name = entry.run.name
    sweep.attempt_ended(name, code)
    elapsed = time.monotonic() - entry.started
    if code == FINISHED and sweep.finished(entry.run):
        outcome.done.append(name)
        valid = [r["val_bpb"] for r in sweep.metrics(name) if "val_bpb" in r]
        say(f"{name}: done in {elapsed:.0f} s" + (f", validation bits/byte {valid[-1]:.3f}" if valid else ""))
    else:
        why = f"exit status {code}: {sweep.last_log_line(name) or 'no output'}"
        outcome.failed.append((name, why))
        say(f"{name}: FAILED ({why})")
