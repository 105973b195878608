"""The one training command every executor runs, and the process that runs it.

Each run is ``python -m unetlm.cli train RECIPE --set ... --out RUN_DIR --resume auto``: safe to
repeat (it continues from the run directory's checkpoint, or starts fresh), wrapped in torchrun
(``python -m torch.distributed.run``) when a run has more than one process, once per node.
Stopping a run sends :data:`STOP_SIGNAL` to its training processes (not to torchrun), which save
a checkpoint and exit with status 75; a run still alive after the grace period is killed, and
resumes from its last checkpoint.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from unetlm.sweep.expand import Run

STOP_SIGNAL = signal.SIGUSR1
DEFAULT_PORT = 29500


def train_args(run: Run, run_dir: Path) -> list[str]:
    """The arguments of ``unetlm`` that train ``run`` into ``run_dir``."""
    args = ["train", run.recipe_path]
    for override in run.overrides:
        args += ["--set", override]
    return args + ["--out", str(run_dir), "--resume", "auto"]


def node_command(args: list[str], gpus: int, nodes: int = 1, node_rank: int | str = 0, master: str = "localhost",
                 port: int | str = DEFAULT_PORT, python: str = sys.executable) -> list[str]:
    """The command one node runs for ``unetlm ARGS``: the CLI itself for one process, else torchrun
    with ``gpus`` processes on this node (``--standalone`` on one node; on several, node ``node_rank``
    of ``nodes`` meeting at ``master:port``, on Slurm the first host of ``SLURM_JOB_NODELIST``)."""
    cli = ["-m", "unetlm.cli", *args]
    per_node = max(gpus, 1)
    if per_node == 1 and nodes == 1:
        return [python, *cli]
    launcher = [python, "-m", "torch.distributed.run", f"--nproc-per-node={per_node}", "--max-restarts=0"]
    if nodes == 1:
        return [*launcher, "--standalone", *cli]
    return [*launcher, f"--nnodes={nodes}", f"--node-rank={node_rank}", f"--master-addr={master}",
            f"--master-port={port}", *cli]


def shell_text(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; [] where it cannot be read)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.parent.name))
    return found


def _ignore_warning_signal() -> None:
    # Slurm's time-limit warning (submitit's SIGUSR2) goes to every process of the job step; only the
    # job's own process acts on it (it stops the run with STOP_SIGNAL), so the training processes ignore it
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TrainProcess:
    """A training command running in its own session, its output appended to a log file."""

    def __init__(self, command: list[str], log: Path, cwd: str | Path | None = None, env: dict | None = None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.torchrun = "torch.distributed.run" in command
        with log.open("ab") as out:
            out.write(f"$ {shell_text(command)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                env=None if env is None else {**os.environ, **env}, start_new_session=True,
                preexec_fn=_ignore_warning_signal,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit status once the process has ended (negative: the signal that killed it), else None.

        Neither reaps the process nor takes Popen's lock, so a signal handler may call it while the
        code it interrupted is waiting for the same process."""
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped already
            return self.popen.returncode
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def wait(self, poll_seconds: float = 0.5) -> int:
        while (code := self.poll()) is None:
            time.sleep(poll_seconds)
        return code

    def stop(self) -> None:
        """Ask the training processes to save a checkpoint and exit (torchrun then exits with them)."""
        targets = _children(self.pid) if self.torchrun else [self.pid]
        for pid in targets:
            try:
                os.kill(pid, STOP_SIGNAL)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop_and_wait(self, grace: float) -> int:
        """Stop the run, wait up to ``grace`` seconds for it to save and exit, then kill what is left."""
        if self.poll() is None:
            self.stop()
            deadline = time.monotonic() + grace
            while self.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if self.poll() is None:
                self.kill()
        return self.wait(0.1)
