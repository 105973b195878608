"""The Slurm executor, on submitit (the optional extra ``slurm``): one array job, one task per run.

Each array task runs the run's training command on every node of its allocation (torchrun per node
for more than one GPU, :func:`unetlm.sweep.command.node_command`). Jobs are submitted with
``--requeue`` and with submitit's warning signal ``--signal=USR2@signal_seconds``: on that signal
(preemption, or the time limit coming) the job stops the training processes, which save a
checkpoint, and submitit requeues the job; the requeued job runs the same command, which continues
from the checkpoint. Job ids and attempts are recorded in ``SWEEP_DIR/jobs/``.

``cluster="local"`` or ``"debug"`` runs the same jobs with submitit's local or in-process executor
(tests, or a workstation without Slurm).
"""
from __future__ import annotations

import re
import shlex
import shutil
import socket
import sys
from pathlib import Path

from unetlm.sweep.command import DEFAULT_PORT, TrainProcess, node_command, train_args
from unetlm.sweep.directory import FINISHED, SweepDir
from unetlm.sweep.expand import Run
from unetlm.sweep.spec import Resources

MAX_REQUEUES = 100  # times a job may reach its time limit and be requeued (preemptions are not counted)
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE")


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise ImportError("--executor slurm needs submitit: pip install 'unetlm[slurm]'") from None
    return submitit


class RunFailed(RuntimeError):
    """A run's training command failed; the message holds its exit status and last log line."""


def extra_options(lines: list[str]) -> dict:
    """``["--qos=high", "--exclusive"]`` -> ``{"qos": "high", "exclusive": True}`` (submitit's form)."""
    options = {}
    for line in lines:
        key, eq, value = line[2:].partition("=")
        options[key] = value if eq else True
    return options


def sbatch_parameters(resources: Resources, name: str) -> dict:
    """The parameters of submitit's SlurmExecutor for every job of the sweep."""
    params = {
        "job_name": name, "time": resources.time_minutes, "nodes": resources.nodes, "ntasks_per_node": 1,
        "signal_delay_s": resources.signal_seconds,
        "additional_parameters": {"requeue": True, **extra_options(resources.sbatch)},
    }
    optional = {"gpus_per_node": resources.gpus, "cpus_per_task": resources.cpus_per_task,
                "partition": resources.partition, "account": resources.account, "setup": resources.setup,
                "array_parallelism": resources.array_limit}
    return params | {k: v for k, v in optional.items() if v}


def job_folder(sweep_root: Path) -> Path:
    return sweep_root / "submitit" / "%j"


def sbatch_script(sweep: SweepDir, runs: list[Run]) -> str:
    """The job script submitit writes for ``runs`` (an array job for more than one), without submitting."""
    require_submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_folder(sweep.root)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    count = {"map_count": len(runs)} if len(runs) > 1 else {}
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(sweep.spec.resources,
                                                                                    _job_name(sweep)), **count)


def _job_name(sweep: SweepDir) -> str:
    return sweep.spec.name or sweep.root.name


def job_port(job_id: str) -> int:
    """A rendezvous port per job, so that jobs sharing a node do not collide."""
    return DEFAULT_PORT + int(re.sub(r"\D", "", job_id) or 0) % 20000


class TrainJob:
    """What one array task runs: the run's training command on this node; requeued on Slurm's warning signal."""

    def __init__(self, sweep_root: str, run: Run, resources: Resources, cwd: str) -> None:
        self.sweep_root, self.run, self.resources, self.cwd = sweep_root, run, resources, cwd
        self._process: TrainProcess | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_process"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _process=None)

    def __call__(self) -> str:
        import submitit

        env = submitit.JobEnvironment()
        sweep = SweepDir.open(self.sweep_root)
        name, main = self.run.name, env.global_rank == 0
        if sweep.finished(self.run):
            return f"{name}: finished"
        resources = self.resources
        args = train_args(self.run, sweep.run_dir(name))
        command = node_command(args, resources.gpus, resources.nodes, env.node, env.hostnames[0], job_port(env.job_id))
        self._process = TrainProcess(command, sweep.log(name) if main else sweep.log(f"{name}.node{env.node}"),
                                     cwd=self.cwd)
        if main:
            sweep.attempt_started(name, socket.gethostname(), self._process.pid, env.job_id)
        code = self._process.wait()
        self._process = None
        if main:
            sweep.attempt_ended(name, code)
        if code != FINISHED or not sweep.finished(self.run):
            raise RunFailed(f"{name}: exit status {code}: {sweep.last_log_line(name) or 'no output'}")
        return f"{name}: finished"

    def checkpoint(self, *args, **kwargs):
        """submitit's hook on the warning signal: stop the run (it saves a checkpoint), then requeue."""
        import submitit

        if self._process is not None:
            code = self._process.stop_and_wait(max(10.0, self.resources.signal_seconds - 30.0))
            if submitit.JobEnvironment().global_rank == 0:
                SweepDir.open(self.sweep_root).attempt_ended(self.run.name, f"requeued (exit status {code})")
        return submitit.helpers.DelayedSubmission(TrainJob(self.sweep_root, self.run, self.resources, self.cwd))


def make_executor(folder: Path, resources: Resources, name: str, cluster: str):
    """submitit's executor: Slurm, or its local (subprocess) or debug (in-process) stand-ins."""
    submitit = require_submitit()
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(**sbatch_parameters(resources, name))
    elif cluster == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=MAX_REQUEUES)
        executor.update_parameters(timeout_min=resources.time_minutes, signal_delay_s=resources.signal_seconds,
                                   tasks_per_node=1, gpus_per_node=resources.gpus)
    elif cluster == "debug":
        executor = submitit.DebugExecutor(folder)
    else:
        raise ValueError(f"cluster {cluster!r}: expected slurm, local or debug")
    return executor


def active(sweep: SweepDir, name: str) -> bool:
    """Whether the run has a job queued or running (so submitting it again would race)."""
    record = sweep.job(name)
    if not record or record.get("executor") != "slurm" or not record.get("job_id"):
        return False
    attempts = record["attempts"]
    if attempts and "end" in attempts[-1] and not str(attempts[-1]["exit"]).startswith("requeued"):
        return False
    state = slurm_state(sweep, record["job_id"])
    return state is None or not state.startswith(TERMINAL_STATES)


def slurm_state(sweep: SweepDir, job_id: str) -> str | None:
    """Slurm's state of a job (sacct, through submitit); None where sacct is not available."""
    if shutil.which("sacct") is None:
        return None
    submitit = require_submitit()
    return submitit.SlurmJob(job_folder(sweep.root), job_id).state


def submit(sweep: SweepDir, runs: list[Run], cluster: str = "slurm", cwd: str = ".") -> list:
    """Submit one job per run (one array job on Slurm); records their ids; returns submitit's jobs."""
    resources = sweep.spec.resources
    executor = make_executor(job_folder(sweep.root), resources, _job_name(sweep), cluster)
    jobs = []
    calls = [TrainJob(str(sweep.root.resolve()), run, resources, str(Path(cwd).resolve())) for run in runs]
    if cluster == "slurm":
        with executor.batch():
            jobs = [executor.submit(call) for call in calls]
    else:
        jobs = [executor.submit(call) for call in calls]
    for run, job in zip(runs, jobs):
        sweep.submitted(run.name, "slurm" if cluster == "slurm" else f"submitit-{cluster}", str(job.job_id))
    return jobs
