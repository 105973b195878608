"""The sweep directory: what a sweep was, where each run lives, what each job did.

Layout of ``SWEEP_DIR``:

- ``sweep.toml``: the sweep as resolved (every default written out); a later command into the same
  directory must define the same runs (see :meth:`SweepSpec.runs_identity`), else it is refused;
- ``runs.json``: the expanded runs (name, recipe, ``--set`` overrides, steps, FLOPs) and the data;
- ``runs/NAME/``: one ordinary run directory per run (checkpoints, metrics.jsonl, recipe.toml);
- ``logs/NAME.log``: everything the run's training command printed, appended over attempts;
- ``jobs/NAME.json``: the executor, the Slurm job id, one record per attempt (host, pid, start, end, exit status);
- ``submitit/``: submitit's job scripts, pickles and logs (Slurm only);
- ``results.md``, ``results.json``, the figures: ``unetlm sweep report``.
"""
from __future__ import annotations

import json
import os
import time
import tomllib
from pathlib import Path

import attrs
import tomli_w

from unetlm.sweep.expand import Run
from unetlm.sweep.spec import SweepError, SweepSpec, sweep_from_dict
from unetlm.checkpoint.sharded import read_train_state
from unetlm.checkpoint.store import latest
from unetlm.train.loop import recipe_differences

SWEEP_FILE, RUNS_FILE = "sweep.toml", "runs.json"

# exit statuses of ``unetlm train``: finished; interrupted with a checkpoint saved (run it again)
FINISHED, INTERRUPTED = 0, 75


def stopped(exit_status) -> bool:
    """Whether a training command that did not finish its steps was stopped rather than failed: it
    saved and exited (75, or 0 and 130 from an older ``unetlm train``) or a signal killed it."""
    return isinstance(exit_status, int) and (exit_status in (FINISHED, INTERRUPTED, 130) or exit_status < 0)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@attrs.define
class SweepDir:
    """An existing sweep directory: its sweep, its runs and the data they all train and are scored on."""

    root: Path
    spec: SweepSpec
    runs: list[Run]
    data: dict  # the runs' [data] table

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def job_file(self, name: str) -> Path:
        return self.root / "jobs" / f"{name}.json"

    @classmethod
    def create(cls, root: str | Path, spec: SweepSpec, runs: list[Run], data: dict) -> "SweepDir":
        """Write a new sweep directory, or open one made by the same sweep (or one it extends: every
        run of the directory still in it, as it was); SweepError, with the differences, for a
        directory of another sweep."""
        root = Path(root)
        if (root / SWEEP_FILE).is_file():
            old = cls.open(root)
            before = {r.name: (r.recipe_path, r.overrides) for r in old.runs}
            after = {r.name: (r.recipe_path, r.overrides) for r in runs}
            if any(after.get(name) != run for name, run in before.items()) or old.data != data:
                diffs = recipe_differences(old.spec.runs_identity(), spec.runs_identity()) or ["its runs' recipe files changed"]
                raise SweepError(
                    f"{root} holds another sweep ({'; '.join(diffs)}); choose another --out, or run that sweep's "
                    f"file (a sweep may only add runs to its directory)"
                )
        elif root.exists() and any(root.iterdir()):
            raise SweepError(f"--out {root} is a folder that is not a sweep directory (no {SWEEP_FILE}); choose "
                             f"an empty or new folder")
        for sub in ("runs", "logs", "jobs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        _write_atomic(root / SWEEP_FILE, tomli_w.dumps(spec.to_dict()))
        _write_atomic(root / RUNS_FILE, json.dumps({"data": data, "runs": [r.to_dict() for r in runs]}, indent=1) + "\n")
        return cls(root, spec, runs, data)

    @classmethod
    def open(cls, root: str | Path) -> "SweepDir":
        root = Path(root)
        try:
            spec = sweep_from_dict(tomllib.loads((root / SWEEP_FILE).read_text(encoding="utf-8")), str(root / SWEEP_FILE))
            saved = json.loads((root / RUNS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SweepError(f"{root} is not a sweep directory (no {SWEEP_FILE} or {RUNS_FILE}); "
                             f"`unetlm sweep SWEEP.toml --out {root}` makes one") from None
        return cls(root, spec, [Run(**r) for r in saved["runs"]], saved["data"])

    # --- the run directories ------------------------------------------------------------------

    def metrics(self, name: str) -> list[dict]:
        """The run's step records so far (a line being written is skipped); [] before its first step."""
        path = self.run_dir(name) / "metrics.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in record:
                records.append(record)
        return records

    def saved_step(self, name: str) -> int | None:
        """The step of the run's newest valid checkpoint; None if it has none."""
        found = latest(self.run_dir(name), read_train_state, on_skip=lambda _warning: None)
        return None if found is None else found[1]["step"]

    def finished(self, run: Run) -> bool:
        """Whether the run trained all its steps: metrics.jsonl logged the last step and the checkpoint holds it."""
        records = self.metrics(run.name)
        return bool(records) and records[-1]["step"] >= run.steps and (self.saved_step(run.name) or 0) >= run.steps

    def last_log_line(self, name: str) -> str:
        """The last non-empty line the run printed (progress bars' carriage returns end lines too)."""
        path = self.log(name)
        if not path.is_file():
            return ""
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 8192))
            tail = f.read().decode("utf-8", errors="replace")
        lines = [line.strip() for line in tail.replace("\r", "\n").split("\n") if line.strip()]
        return lines[-1] if lines else ""

    # --- job records --------------------------------------------------------------------------

    def job(self, name: str) -> dict | None:
        path = self.job_file(name)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write_job(self, name: str, record: dict) -> None:
        _write_atomic(self.job_file(name), json.dumps(record, indent=1) + "\n")

    def submitted(self, name: str, executor: str, job_id: str | None = None) -> None:
        """A new job for the run (its attempts so far are kept)."""
        record = self.job(name) or {"attempts": []}
        self.write_job(name, record | {"executor": executor, "job_id": job_id, "submitted": time.time()})

    def attempt_started(self, name: str, host: str, pid: int, job_id: str | None = None) -> None:
        record = self.job(name) or {"executor": "local", "attempts": []}
        record["attempts"].append({"host": host, "pid": pid, "job_id": job_id, "start": time.time()})
        self.write_job(name, record)

    def attempt_ended(self, name: str, exit_status: int | str) -> None:
        """``exit_status``: the training command's exit status (negative: killed by that signal) or
        ``"requeued"``."""
        record = self.job(name)
        if record and record["attempts"]:
            record["attempts"][-1] |= {"end": time.time(), "exit": exit_status}
            self.write_job(name, record)

