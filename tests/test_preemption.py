"""Runs that survive preemption and refuse unsafe starts: stop signals, the checkpoint schedule,
exit statuses, metrics after a resume, the run directory's lock, launches that are not one
process group, paper-scale recipes without a corpus, and the Slurm script's launch logic."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tomli_w
import torch

import unetlm
from test_train import corpus, interrupt_at, losses, saved, tiny_recipe, tiny_recipe_dict  # noqa: F401
from unetlm import cli
from unetlm.core.errors import UsageError
from unetlm.core.locks import FileLock
from unetlm.recipe import load_recipe, recipe_from_dict
from unetlm.recipe.schema import TrainingSpec
from unetlm.train import distributed, loop, preemption
from unetlm.train.metrics import MetricsWriter, read_metrics
from unetlm.train.distributed import World
from unetlm.train.preemption import CheckpointSchedule, StopSignals
from unetlm.train.runlock import LOCK, lock_run

ROOT = Path(__file__).resolve().parents[1]
ONE = World(0, 1, 0, torch.device("cpu"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_signal_sets_a_flag_a_repeat_within_the_window_is_the_same_request_a_second_one_exits(monkeypatch):
    exits = []
    monkeypatch.setattr(preemption, "_exit_now", exits.append)
    clock = Clock()
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(clock) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM and exits == []
        clock.now = preemption.REPEAT_WINDOW_S / 2  # torchrun's agent forwarding what Slurm sent every process
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGTERM and exits == []
        clock.now = preemption.REPEAT_WINDOW_S + 1
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [128 + signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_schedule_saves_every_n_steps_every_m_minutes_on_rank_0s_clock_and_on_a_stop():
    clock = Clock()
    spec = TrainingSpec(checkpoint_every=4, checkpoint_every_minutes=1.0)
    with StopSignals(clock) as signals:
        schedule = CheckpointSchedule(spec, ONE, signals, saved_step=0, clock=clock)
        assert schedule.at(0, 10).save is False  # the start: nothing to save
        assert schedule.at(1, 10).save is False
        clock.now = 61.0
        assert schedule.at(2, 10).save is True
        schedule.saved(2)
        assert schedule.at(3, 10).save is False and schedule.at(4, 10).save is True
        assert schedule.at(10, 10).save is True  # the last step
        os.kill(os.getpid(), signal.SIGUSR1)
        boundary = schedule.at(5, 10)
        assert (boundary.save, boundary.stop, boundary.signal) == (True, True, "SIGUSR1")
        schedule.saved(5)
        assert schedule.at(5, 10).save is False  # a step already saved is not saved again


def test_checkpoint_every_minutes_saves_between_step_checkpoints(corpus, tmp_path, monkeypatch):
    ticks = iter(range(0, 10_000, 40))  # each look at rank 0's clock: 40 s later

    class FakeTime:
        monotonic = staticmethod(lambda: float(next(ticks)))

    monkeypatch.setattr(preemption, "time", FakeTime)
    written = []
    real_save = loop.Checkpointer.save
    monkeypatch.setattr(loop.Checkpointer, "save", lambda self, step: (written.append(step), real_save(self, step)))
    loop.train(tiny_recipe(corpus, steps=5, checkpoint_every=100, checkpoint_every_minutes=1.0), tmp_path,
               progress=False, sample=False)
    # the clock is read at the start (0 s), at each boundary and after each save: 80 s at step 1's
    # boundary, 80 s after that save at step 3's, then the end
    assert written == [1, 3, 5]


def test_a_signal_during_a_save_lets_it_finish_and_stops_at_the_next_boundary(corpus, tmp_path, monkeypatch):
    real_save, calls = loop.Checkpointer.save, []

    def signalled_save(self, step):
        calls.append(step)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint of step 2 is written
        real_save(self, step)

    monkeypatch.setattr(loop.Checkpointer, "save", signalled_save)
    result = loop.train(tiny_recipe(corpus, steps=6, checkpoint_every=2), tmp_path, progress=False, sample=False)
    assert result["interrupted"] == "SIGTERM" and calls == [2, 3]
    assert saved(tmp_path)["step"] == 3 and max(losses(tmp_path)) == 3


def test_the_train_command_exits_75_after_saving_on_sigint_and_the_same_command_finishes(corpus, tmp_path,
                                                                                       monkeypatch, capsys):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_dict(corpus, steps=3, eval_every=100)), encoding="utf-8")
    command = ["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]
    with monkeypatch.context() as m:
        interrupt_at(m, 2)  # Ctrl-C
        assert cli.main(command) == preemption.INTERRUPTED
    assert "interrupted by SIGINT" in capsys.readouterr().err and saved(tmp_path / "run")["step"] == 2
    assert cli.main(command) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert cli.main(command) == 0 and "nothing to do" in capsys.readouterr().out  # safe to repeat
    assert cli.main([*command, "--resume", "no"]) == 2
    assert "holds a checkpoint (step 3) and --resume no" in capsys.readouterr().err


def test_ctrl_c_while_a_finished_run_writes_its_sample_ends_it_as_finished(corpus, tmp_path, monkeypatch, capsys):
    def sample(recipe, out):
        os.kill(os.getpid(), signal.SIGINT)  # the run trained to its end; the sample is being written
        return "sampled"

    monkeypatch.setattr(loop, "sample_text", sample)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_dict(corpus, steps=2, sample_bytes=8)), encoding="utf-8")
    assert cli.main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "interrupted" not in capsys.readouterr().err


def test_sigusr1_to_a_training_process_saves_the_current_step_and_exits_75(corpus, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_dict(corpus, steps=500, checkpoint_every=1000, eval_every=1000,
                                                     threads=1)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(unetlm.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    run = subprocess.Popen([sys.executable, "-m", "unetlm.cli", "train", str(recipe), "--out", str(out), "--quiet"],
                           env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline and not (
                (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            time.sleep(0.05)
        run.send_signal(signal.SIGUSR1)
        _, err = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 75, err[-2000:]
    step = saved(out)["step"]
    assert 1 <= step < 500 and max(losses(out)) == step and f"holds step {step}" in err


def test_a_resume_drops_the_records_after_the_checkpoint(corpus, tmp_path):
    """A run killed after its checkpoint of step 3 had written records of steps 4 and 5 (and half a line)."""
    recipe = tiny_recipe(corpus, steps=5, checkpoint_every=3)
    loop.train(recipe, tmp_path, progress=False, sample=False, stop_at=3)
    metrics = tmp_path / "metrics.jsonl"
    lost = "".join(f'{{"step": {step}, "loss": 99.0}}\n' for step in (4, 5)) + '{"step": 6, "lo'
    metrics.write_text(metrics.read_text() + lost, encoding="utf-8")
    assert MetricsWriter(tmp_path / "copy.jsonl").keep_until(3) == 0  # no file: nothing to drop
    loop.train(recipe, tmp_path, progress=False, sample=False)
    records = read_metrics(metrics)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5] and 99.0 not in [r["loss"] for r in records]


def test_two_runs_on_one_run_directory_are_refused_and_a_killed_run_leaves_no_stale_lock(corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = FileLock(out / LOCK)
    assert other.acquire(wait=False)
    with pytest.raises(loop.TrainingError, match=rf"--out {out} is in use by another run \(host .* pid {os.getpid()}\)"):
        loop.train(tiny_recipe(corpus), out, progress=False)
    other.release()
    holder = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys; from unetlm.core.locks import FileLock; "
         "FileLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)", str(out / LOCK)],
        env={**os.environ, "PYTHONPATH": str(Path(unetlm.__file__).parents[1])},
    )
    assert holder.returncode == -signal.SIGKILL
    lock = lock_run(out, ONE)
    assert lock.held and not lock.created
    lock.release()
    assert (out / LOCK).is_file()  # the directory was there before: it stays as it was


def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path):
    """A data loader's worker, forked while the run held its lock, outlives a killed run for a while:
    the lock must still be free for the same command again."""
    code = ("import os, sys, time; from unetlm.core.locks import FileLock; FileLock(sys.argv[1]).acquire()\n"
            "child = os.fork()\nif child == 0:\n    null = os.open(os.devnull, os.O_WRONLY)\n"
            "    os.dup2(null, 1), os.dup2(null, 2)\n    time.sleep(60)\n    os._exit(0)\n"
            "print(child, flush=True); os._exit(0)")
    parent = subprocess.run([sys.executable, "-c", code, str(tmp_path / LOCK)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(unetlm.__file__).parents[1])}, timeout=60)
    child = int(parent.stdout)
    try:
        assert Path(f"/proc/{child}").exists()  # the child lives on
        lock = FileLock(tmp_path / LOCK)
        assert lock.acquire(wait=False)
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_several_processes_without_torchrun_are_refused_with_one_line(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(UsageError, match="srun started 4 processes .* without torchrun's RANK and WORLD_SIZE"):
        distributed.launch_rank()
    assert cli.main(["train", str(ROOT / "recipes" / "tiny" / "au2.toml"), "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scripts/slurm/train.sbatch" in err
    monkeypatch.setenv("WORLD_SIZE", "4")  # under torchrun the same variable is fine
    monkeypatch.setenv("RANK", "3")
    assert distributed.launch_rank() == (3, 4, 0)


def test_the_data_cache_is_prepared_behind_a_lock(tmp_path, monkeypatch):
    from unetlm.data import corpora
    from unetlm.data.prepared import cache_key

    monkeypatch.setenv("UNETLM_CACHE", str(tmp_path))
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "au2.toml", ["data.max_bytes=40000"])
    (tmp_path / "prepared").mkdir()
    holder = FileLock(tmp_path / "prepared" / f"{cache_key(recipe)}.lock")
    holder.acquire()  # another process preparing
    done = []
    waiter = threading.Thread(target=lambda: done.append(corpora.prepare_cached(recipe, progress=False)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not done
    holder.release()
    waiter.join(60)
    assert done == [tmp_path / "prepared" / cache_key(recipe)]


def test_paper_scale_recipes_name_no_corpus_and_say_how_to_prepare_one(capsys):
    paper = sorted((ROOT / "recipes").glob("*.toml"))
    assert len(paper) >= 15 and all(load_recipe(p).data.source == "none" for p in paper)
    for command in (["train", str(paper[0]), "--out", "unused"], ["prepare", str(paper[0]), "--out", "unused"]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "data.source = 'none'" in err and "unetlm prepare RECIPE" in err
    assert load_recipe(ROOT / "recipes" / "tiny" / "au4.toml").data.source == "pydocs"


def test_a_run_that_repeats_its_data_says_so_at_the_start(corpus, tmp_path, capsys):
    from unetlm.data.windows import TrainingData
    from unetlm.train.repeats import epochs, repeat_note

    data = TrainingData.from_documents([bytes(range(32, 127)) * 20], [], [], 64, 4, 0.2, 0)
    rows = len(data.sources[0].train)
    assert epochs(data, rows) == pytest.approx(4.0) and repeat_note(data, rows) is None  # 4 passes: fine
    assert "5.0 times (5 epochs)" in repeat_note(data, rows * 5 // 4)
    recipe = tiny_recipe(corpus, steps=400, batch_size=8, eval_every=1000, checkpoint_every=1000)
    loop.train(recipe, tmp_path / "many", progress=False, sample=False, stop_at=1)
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if "epochs" in line]
    assert len(note) == 1 and "400 steps of 8 sequences read the" in note[0] and "unetlm prepare" in note[0]


def test_different_recipe_refusal_is_one_line_naming_the_keys(corpus, tmp_path):
    loop.train(tiny_recipe(corpus, steps=1), tmp_path, progress=False, sample=False)
    changed = tiny_recipe_dict(corpus, steps=2, lr=0.1, weight_decay=0.2, beta1=0.8, beta2=0.9, seed=3, eval_every=7,
                               log_every=2)
    changed["model"]["stages"][1]["dim"] = 48
    with pytest.raises(loop.TrainingError) as err:
        loop.train(recipe_from_dict(changed), tmp_path, progress=False, sample=False)
    text = str(err.value)
    assert "\n" not in text and "model.stages[1].dim: 32 -> 48; training.beta1: 0.9 -> 0.8" in text
    assert "training.lr: 0.003 -> 0.1; and 2 more" in text
    assert "eval_every" not in text and "log_every" not in text and "steps" not in text  # these may change
    assert text.startswith(f"{tmp_path} holds a checkpoint of another recipe") and f"({tmp_path / 'recipe.toml'})" in text
    renamed = tiny_recipe_dict(corpus, steps=2)
    renamed.update(name="a-copy", description="the same recipe under another name")
    loop.train(recipe_from_dict(renamed), tmp_path, progress=False, sample=False)  # a copied file resumes


# ----------------------------------------------------------------------------------- Slurm

SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"


def fake_slurm(tmp_path: Path, srun_body: str) -> dict:
    """``srun``, ``scontrol`` and ``scancel`` stand-ins that log their arguments; the environment of a job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    tools = {
        "scontrol": f'echo "scontrol $*" >> {log}; [[ $1 == show ]] && printf "gpu017\\ngpu018\\n"; exit 0',
        "scancel": f'echo "scancel $*" >> {log}; touch {tmp_path}/stop',
        "srun": f'echo "srun $*" >> {log}; {srun_body}',
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_GPUS_ON_NODE": "4",
            "SLURM_CPUS_PER_TASK": "32"}


def test_the_sbatch_script_starts_one_torchrun_per_node_at_a_rendezvous_on_the_first_node(tmp_path):
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    env = fake_slurm(tmp_path, "exit 0")
    done = subprocess.run(["bash", str(SBATCH), "recipes/au4.toml", "/runs/au4", "--set", "data.prepared=/data/au4"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    srun = next(c for c in calls if c.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun and "--cpus-per-task=32" in srun
    assert "-m torch.distributed.run --nnodes 2 --nproc-per-node 4" in srun
    assert "--rdzv-backend c10d --rdzv-endpoint gpu017:29500 --rdzv-id 4242" in srun
    assert srun.endswith("-m unetlm.cli train recipes/au4.toml --out /runs/au4 --resume auto --set data.prepared=/data/au4")
    assert not any("requeue" in c for c in calls)
    header = (ROOT / "scripts" / "slurm" / "train.sbatch").read_text()
    for directive in ("--signal=B:USR1@", "--requeue", "--ntasks-per-node=1", "--open-mode=append", "%j"):
        assert directive in header


@pytest.mark.parametrize("saves", [True, False])
def test_the_sbatch_script_requeues_at_the_time_limit_warning_only_after_a_save(tmp_path, saves):
    """torchrun, itself signalled, ends with status 1 whatever its workers did: the new step folder
    is what tells a saved stop from a failed one (say, a full disk during the save)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000050").mkdir(parents=True)
    (run / "checkpoints" / "step-0000120.tmp").mkdir()  # a save in progress is not a checkpoint
    save = f"mkdir {run}/checkpoints/step-0000100; " if saves else ""
    # the stand-in for srun runs until the job's steps are signalled, then ends as torchrun does
    env = fake_slurm(tmp_path, f"for i in $(seq 200); do [[ -e {tmp_path}/stop ]] && {{ {save}exit 1; }}; "
                               f"sleep 0.05; done; exit 9")
    script = subprocess.Popen(["bash", str(SBATCH), "recipes/au4.toml", str(run)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "calls.log").is_file() or "srun" not in (tmp_path / "calls.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    script.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends the batch shell
    output, _ = script.communicate(timeout=30)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert "scancel --signal=TERM 4242" in calls
    if saves:
        assert script.returncode == 0 and calls[-1] == "scontrol requeue 4242", output
        assert "with step-0000100 saved" in output
    else:
        assert script.returncode == 1 and not any(c.startswith("scontrol requeue") for c in calls), output
        assert "without a new checkpoint (status 1): not requeued" in output


def test_the_sbatch_script_reports_a_failed_run_without_requeueing(tmp_path):
    env = fake_slurm(tmp_path, "exit 3")
    done = subprocess.run(["bash", str(SBATCH), "recipes/au4.toml", "/runs/au4"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3 and "status 3" in done.stderr
    assert not any("requeue" in c for c in (tmp_path / "calls.log").read_text().splitlines())
    usage = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")
    env.pop("SLURM_JOB_NODELIST")
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/bash\nexit 1\n")  # no hostnames to show
    by_hand = subprocess.run(["bash", str(SBATCH), "recipes/au4.toml", "/runs/au4"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert by_hand.returncode == 2 and "no first node in SLURM_JOB_NODELIST" in by_hand.stderr


@pytest.mark.parametrize("array, shard", [
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, "3/8"),  # --array=0-7
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4",
      "SLURM_ARRAY_TASK_COUNT": "4"}, "3/4"),  # --array=1-4
    ({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "6",
      "SLURM_ARRAY_TASK_STEP": "2"}, "3/4"),  # --array=0-6:2, no count given
])
def test_the_prepare_array_script_gives_each_task_its_share(tmp_path, array, shard):
    script = ROOT / "scripts" / "slurm" / "prepare.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/bash\necho "$*" > {tmp_path}/args\n')
    fake_python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    env |= {"PYTHON": str(fake_python), "SLURM_CPUS_PER_TASK": "4", **array}
    done = subprocess.run(["bash", str(script), "recipes/au4.toml", "/data/au4", "--set", "data.source=files"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "args").read_text().split() == [
        "-m", "unetlm.cli", "prepare", "recipes/au4.toml", "--out", "/data/au4", "--shard", shard, "--workers", "4",
        "--quiet", "--set", "data.source=files"]
