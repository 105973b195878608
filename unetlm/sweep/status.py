"""``unetlm sweep status SWEEP_DIR``: one line per run, read from its run directory, job record and log.

States: ``done``; ``running`` (step, last loss, ETA, age of the last record); ``queued`` (a job
submitted, not started; or never started); ``interrupted`` (stopped with a checkpoint: run the
sweep again, or Slurm requeues it); ``failed`` (exit status and the last line of its log).
"""
from __future__ import annotations

import os
import socket
import time

import attrs

from unetlm.sweep.directory import SweepDir, stopped
from unetlm.sweep.expand import Run

STATES = ("done", "running", "queued", "interrupted", "failed")


@attrs.frozen
class RunStatus:
    name: str
    state: str  # one of STATES
    detail: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _progress(sweep: SweepDir, run: Run) -> str:
    records = sweep.metrics(run.name)
    if not records:
        return "starting"
    last = records[-1]
    text = f"step {last['step']:,}/{run.steps:,}, loss {last['loss']:.3f}"
    per_step = last["bytes"] / max(last["step"], 1)
    if last.get("bytes_per_s"):
        text += f", ETA {_duration((run.steps - last['step']) * per_step / last['bytes_per_s'])}"
    age = time.time() - (sweep.run_dir(run.name) / "metrics.jsonl").stat().st_mtime
    return text + f" (last record {_duration(age)} ago)"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def run_status(sweep: SweepDir, run: Run) -> RunStatus:
    name = run.name
    if sweep.finished(run):
        valid = [r["val_bpb"] for r in sweep.metrics(name) if "val_bpb" in r]
        return RunStatus(name, "done", f"{run.steps:,} steps" + (f", validation bits/byte {valid[-1]:.3f}" if valid else ""))
    record = sweep.job(name)
    attempts = (record or {}).get("attempts", [])
    job = f"job {record['job_id']}" if record and record.get("job_id") else ""
    if not attempts:
        return RunStatus(name, "queued", job or "not started")
    last = attempts[-1]
    if "end" not in last:
        local = record.get("executor") == "local" and last.get("host") == socket.gethostname()
        if local and not _alive(last["pid"]):
            return RunStatus(name, "interrupted", f"its process {last['pid']} is gone; {_saved(sweep, name)}")
        return RunStatus(name, "running", ", ".join(filter(None, [_progress(sweep, run), job])))
    exit_status = last["exit"]
    if str(exit_status).startswith("requeued"):
        return RunStatus(name, "queued", f"{job} requeued after {exit_status.partition('(')[2].rstrip(')')}; "
                                         f"{_saved(sweep, name)}")
    if stopped(exit_status):
        why = f"killed by signal {-exit_status}" if exit_status < 0 else f"stopped (exit status {exit_status})"
        return RunStatus(name, "interrupted", f"{why}; {_saved(sweep, name)}; run the sweep again to continue")
    line = sweep.last_log_line(name) or "no output"
    return RunStatus(name, "failed", f"exit status {exit_status}: {line}")


def _saved(sweep: SweepDir, name: str) -> str:
    step = sweep.saved_step(name)
    return "no checkpoint yet" if step is None else f"checkpoint at step {step:,}"


def sweep_status(sweep: SweepDir) -> list[RunStatus]:
    return [run_status(sweep, run) for run in sweep.runs]


def status_text(statuses: list[RunStatus]) -> str:
    width = max(len(s.name) for s in statuses)
    lines = [f"{s.name:<{width}}  {s.state:<11}  {s.detail}" for s in statuses]
    counts = {state: sum(s.state == state for s in statuses) for state in STATES}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items() if n) + f" (of {len(statuses)} runs)")
    return "\n".join(lines)
