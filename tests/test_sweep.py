"""``unetlm sweep``: grids expand as written, runs train locally and through submitit (requeued after
a kill, with the weights of an uninterrupted run), failures are reported, the report compares and fits."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tomli_w
import torch

from unetlm.cli import main
from unetlm.eval.bootstrap import paired_bootstrap_ci
from unetlm.recipe.load import parse_value
from unetlm.sweep.command import node_command
from unetlm.sweep.directory import SweepDir
from unetlm.sweep.expand import expand, sci, toml_value
from unetlm.sweep.fits import crossover, fit_power_law
from unetlm.sweep.launch import launch, plan_sweep
from unetlm.sweep.report import report
from unetlm.sweep.spec import SweepError, load_sweep
from unetlm.sweep.status import run_status, sweep_status

from strategies import ROOT, SWEEPS
from test_train import tiny_recipe_dict, write_corpus

needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="pip install submitit")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny recipe file (no [data]) and a corpus glob."""
    tmp = tmp_path_factory.mktemp("sweep")
    corpus = write_corpus(tmp / "corpus")
    data = tiny_recipe_dict(corpus, threads=1)
    del data["data"]
    path = tmp / "tiny.toml"
    path.write_text(tomli_w.dumps(data))
    return str(path), corpus


def write_sweep(path, recipe: str, corpus: str, **keys) -> str:
    body = {"recipes": [recipe], "data": {"source": "files", "paths": [corpus], "valid_fraction": 0.2}} | keys
    path.write_text(tomli_w.dumps(body))
    return str(path)


def one_step_flops(recipe: str, corpus: str, tmp_path) -> float:
    spec = load_sweep(write_sweep(tmp_path / "probe.toml", recipe, corpus))
    return expand(spec)[0].flops_per_step


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_the_shipped_sweep_files_expand(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # their paths are read from the repository root
    runs = expand(load_sweep(path))
    assert len(runs) >= 4 and all(r.steps >= 1 for r in runs)


def test_a_grid_expands_into_product_zip_budgets_and_seeds(tiny, tmp_path):
    recipe, corpus = tiny
    per_step = one_step_flops(recipe, corpus, tmp_path)
    path = write_sweep(
        tmp_path / "grid.toml", recipe, corpus, budgets=[per_step * 3.5, per_step * 8], seeds=2,
        set=["training.lr=0.002"],
        grid={"model.stages[1].pooler.name": ["select", "mean"]},
        zip=[{"model.stages[0].dim": [16, 24], "model.stages[1].dim": [32, 48]}],
    )
    runs = expand(load_sweep(path))
    assert len(runs) == 2 * 2 * 2 * 2  # pooler x (dims zipped) x budgets x seeds
    assert len({r.name for r in runs}) == len(runs)
    assert runs[0].name == f"tiny-pooler=select-dim=16+32-flops={sci(per_step * 3.5)}-seed=0"
    for run in runs:
        recipe_ = run.recipe()
        dims = [s.dim for s in recipe_.model.stages]
        assert dims in ([16, 32], [24, 48])  # zipped keys advance together, never crossed
        assert recipe_.training.lr == 0.002 and recipe_.data.valid_fraction == 0.2
        assert run.steps * run.flops_per_step <= run.budget < (run.steps + 1) * run.flops_per_step
        assert run.seed == int(run.labels["seed"])  # the recipe's seed (0) + i
        assert run.config == run.name.rsplit("-flops=", 1)[0]
    assert {r.steps for r in runs if r.labels["dim"] == "16+32"} == {3, 8}
    pooled = {(r.labels["pooler"], r.labels["dim"]) for r in runs}
    assert pooled == {(p, d) for p in ("select", "mean") for d in ("16+32", "24+48")}


@pytest.mark.parametrize("value", [3, 2.5e-3, True, "mean", "two words", "true", "1e3", [1, "a"],
                                   {"name": "select", "norm": True}, {"a b": [{"x": 1.5}]}])
def test_toml_values_read_back_as_themselves(value):
    assert parse_value(toml_value(value)) == value


@pytest.mark.parametrize("keys, message", [
    ({"grid": {"model.stages[1].poolr.name": ["mean"]}}, r"grid key 'model.stages\[1\].poolr.name'.*did you mean 'pooler'"),
    ({"grid": {"training.steps": []}}, "empty grid axis"),
    ({"zip": [{"training.lr": [1e-3, 2e-3], "training.seed": [1]}]}, "need one length"),
    ({"budgets": [1.0]}, "one training step costs .* more than the budget 1"),
    ({"grid": {"training.lr": [0.001, 1e-3]}}, "two runs would share the name"),
    ({"grid": {"data.max_bytes": [10]}}, "the data is the sweep's \\[data\\] table"),
    ({"resourcez": {}}, "resourcez: unknown key; did you mean 'resources'"),
    ({"resources": {"gpus": 1, "gpu_memory": "80 gigs"}}, "resources.gpu_memory '80 gigs' is invalid"),
    ({"set": ["training.steps=5"], "budgets": [1e12]}, "with training.steps=5.*: training.steps is set by the sweep's budgets"),
])
def test_bad_sweep_files_are_one_line_each(tiny, tmp_path, capsys, keys, message):
    recipe, corpus = tiny
    path = write_sweep(tmp_path / "bad.toml", recipe, corpus, **keys)
    assert main(["sweep", path, "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unetlm: error: ")
    assert re.search(message, err), err


def test_slurm_without_submitit_names_the_pip_command(tiny, tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == "submitit" or name.startswith("submitit."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    recipe, corpus = tiny
    path = write_sweep(tmp_path / "s.toml", recipe, corpus)
    assert main(["sweep", path, "--executor", "slurm", "--out", str(tmp_path / "out")]) == 2
    assert "pip install 'unetlm[slurm]'" in capsys.readouterr().err


@needs_submitit
def test_slurm_without_sbatch_is_one_line_before_the_sweep_directory_exists(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    recipe, corpus = tiny
    path = write_sweep(tmp_path / "s.toml", recipe, corpus)
    assert main(["sweep", path, "--executor", "slurm", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sbatch, which is not on this machine's PATH" in err
    assert not (tmp_path / "out").exists()


@needs_submitit
def test_the_job_script_requeues_signals_and_asks_for_the_resources(tiny, tmp_path, capsys):
    recipe, corpus = tiny
    resources = {"gpus": 8, "nodes": 2, "time_minutes": 600, "partition": "gpu", "account": "lm", "cpus_per_task": 64,
                 "sbatch": ["--qos=high", "--exclusive"], "setup": ["source .venv/bin/activate"], "array_limit": 3,
                 "signal_seconds": 180}
    path = write_sweep(tmp_path / "s.toml", recipe, corpus, grid={"training.lr": [1e-3, 2e-3]}, resources=resources,
                       set=["training.batch_size=16"])  # the planner refuses a batch that 16 GPUs cannot split
    out = tmp_path / "out"
    assert main(["sweep", path, "--executor", "slurm", "--dry-run", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    script = text[text.index("#!/bin/bash"):]
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --time=600", "#SBATCH --partition=gpu",
                 "#SBATCH --account=lm", "#SBATCH --cpus-per-task=64", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@180", "#SBATCH --qos=high", "#SBATCH --exclusive",
                 "#SBATCH --array=0-1%2", "source .venv/bin/activate"):
        assert line in script, line
    assert "srun" in script and "-m submitit.core._submit" in script and str(out / "submitit") in script
    assert not out.exists()  # nothing written, nothing submitted
    commands = [line for line in text.splitlines() if "-m unetlm.cli train" in line]
    assert len(commands) == 2
    assert "--nproc-per-node=8" in commands[0] and "--nnodes=2" in commands[0] and "--resume auto" in commands[0]
    assert "--set training.lr=0.001" in commands[0] and "--node-rank=NODE" in commands[0]


def test_the_dry_run_refuses_a_run_that_cannot_fit(tiny, tmp_path, capsys):
    recipe, corpus = tiny
    path = write_sweep(tmp_path / "s.toml", recipe, corpus, resources={"gpus": 8, "nodes": 2})  # batch 4 on 16 GPUs
    assert main(["sweep", path, "--dry-run", "--out", str(tmp_path / "out"), "--quiet"]) == 1
    out, err = capsys.readouterr()
    assert "DOES NOT FIT" in out
    assert err.startswith("unetlm: error: 1 of 1 runs do not fit; nothing was started. tiny: ") and "16" in err


def test_torchrun_per_node():
    args = ["train", "r.toml", "--out", "runs/x"]
    assert node_command(args, 0, python="py") == ["py", "-m", "unetlm.cli", *args]
    assert node_command(args, 4, python="py")[:6] == ["py", "-m", "torch.distributed.run", "--nproc-per-node=4",
                                                      "--max-restarts=0", "--standalone"]
    multi = node_command(args, 8, nodes=2, node_rank=1, master="node7", port=29511, python="py")
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=node7", "--master-port=29511"} <= set(multi)
    assert multi[-len(args) - 2:] == ["-m", "unetlm.cli", *args]


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
    """A 2 x 2 grid (pooler x upsampler), two runs at once, reported."""
    recipe, corpus = tiny
    tmp = tmp_path_factory.mktemp("swept")
    per_step = one_step_flops(recipe, corpus, tmp)
    path = write_sweep(tmp / "ablation.toml", recipe, corpus, budgets=[per_step * 4.5],
                       grid={"model.stages[1].pooler.name": ["select", "mean"],
                             "model.stages[1].upsampler.name": ["multi-linear", "linear"]},
                       resources={"parallel": 2}, report={"eval_bytes": 2000, "block_bytes": 128})
    out = tmp / "out"
    assert main(["sweep", path, "--out", str(out), "--quiet"]) == 0
    return path, out


def test_a_local_sweep_trains_every_run_into_an_ordinary_run_directory(swept, capsys):
    path, out = swept
    sweep = SweepDir.open(out)
    assert [s.state for s in sweep_status(sweep)] == ["done"] * 4
    for run in sweep.runs:
        run_dir = sweep.run_dir(run.name)
        assert (run_dir / "recipe.toml").is_file() and sweep.saved_step(run.name) == run.steps in (4, 5)
        assert sweep.job(run.name)["attempts"][-1]["exit"] == 0
    assert main(["sweep", "status", str(out)]) == 0
    assert "4 done (of 4 runs)" in capsys.readouterr().out


def test_the_report_compares_on_the_same_blocks(swept, capsys, monkeypatch):
    path, out = swept
    assert main(["sweep", "report", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["rows"]) == 4 and not results["unscored"]
    for row in results["rows"]:
        assert row["ci"][0] <= row["bpb"] <= row["ci"][1] and row["causal"] and not row["below_floor"]
    assert sorted(p["axis"] for p in results["pairs"]) == ["pooler", "pooler", "upsampler", "upsampler"]
    md = (out / "results.md").read_text()
    assert "## Differences on the same held-out blocks" in md and "| tiny-pooler=mean-upsampler=linear |" in md
    for name in ("held-out.png", "differences.png", "bpb-vs-flops.png"):
        assert (out / name).stat().st_size > 10_000 and f"]({name})" in md

    monkeypatch.setattr("unetlm.sweep.score.load_trained", lambda *a: pytest.fail("scored again"))
    assert [r["bpb"] for r in report(out, progress=False)["rows"]] == [r["bpb"] for r in results["rows"]]


def test_a_sweep_directory_of_another_sweep_is_refused_with_the_difference(swept, tmp_path, capsys):
    path, out = swept
    other = load_sweep(path)
    other.grid["model.stages[1].pooler.name"] = ["select"]
    with pytest.raises(SweepError, match=r"holds another sweep \(grid.model.stages\[1\].pooler.name"):
        launch(plan_sweep(other, out), progress=False)


def test_a_failed_run_is_reported_and_the_rest_goes_on(tiny, tmp_path, capsys):
    recipe, corpus = tiny
    path = write_sweep(tmp_path / "f.toml", recipe, corpus, set=["training.steps=3", "training.eval_every=3"],
                       grid={"training.lr": [1e30, 3e-3]}, report={"eval_bytes": 1000})
    out = tmp_path / "out"
    assert main(["sweep", path, "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "tiny-lr=1e30: exit status 1: unetlm: error: " in err and "1 of 2 runs failed" in err
    sweep = SweepDir.open(out)
    states = {s.name: s for s in sweep_status(sweep)}
    assert states["tiny-lr=0.003"].state == "done"
    assert states["tiny-lr=1e30"].state == "failed" and "became" in states["tiny-lr=1e30"].detail
    assert main(["sweep", "report", str(out), "--quiet"]) == 1  # reported, then the failure named
    assert "- tiny-lr=1e30: failed, exit status 1" in (out / "results.md").read_text()
    assert "1 run(s) not scored: tiny-lr=1e30 (failed)" in capsys.readouterr().err


def test_a_run_still_running_from_an_earlier_start_is_not_started_again(tiny, tmp_path, capsys):
    """The sweep's terminal closed, its training process lives on: the same command again trains the
    other runs and leaves that one alone, neither a second copy nor a failure."""
    recipe, corpus = tiny
    path = write_sweep(tmp_path / "s.toml", recipe, corpus, set=["training.steps=2", "training.eval_every=2"],
                       grid={"training.seed": [1, 2]})
    planned = plan_sweep(load_sweep(path), tmp_path / "out", path)
    sweep = SweepDir.create(planned.root, planned.spec, planned.runs, planned.data)
    orphan, other = sweep.runs
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sweep.attempt_started(orphan.name, socket.gethostname(), stand_in.pid)
        assert main(["sweep", path, "--out", str(tmp_path / "out"), "--quiet"]) == 75
    finally:
        stand_in.kill()
        stand_in.wait()
    assert f"still running from an earlier start ({orphan.name})" in capsys.readouterr().err
    assert sweep.finished(other) and not sweep.run_dir(orphan.name).exists()


def test_status_reads_job_records(tiny, tmp_path):
    recipe, corpus = tiny
    sweep = plan_sweep(load_sweep(write_sweep(tmp_path / "s.toml", recipe, corpus, grid={"training.seed": [1, 2, 3, 4]})),
                       tmp_path / "out")
    sweep = SweepDir.create(sweep.root, sweep.spec, sweep.runs, sweep.data)
    a, b, c, d = sweep.runs
    sweep.submitted(a.name, "slurm", "123_0")
    sweep.attempt_started(b.name, "elsewhere", 1, "123_1")
    sweep.attempt_started(c.name, "elsewhere", 1)
    sweep.attempt_ended(c.name, 75)
    sweep.attempt_started(d.name, "elsewhere", 1)
    sweep.attempt_ended(d.name, 1)
    sweep.log(d.name).parent.mkdir(exist_ok=True)
    sweep.log(d.name).write_text("step 1\rstep 2\nunetlm: error: the disk is full\n")
    assert run_status(sweep, a).state == "queued" and "job 123_0" in run_status(sweep, a).detail
    assert run_status(sweep, b).state == "running"
    assert run_status(sweep, c).state == "interrupted" and "no checkpoint yet" in run_status(sweep, c).detail
    failed = run_status(sweep, d)
    assert failed.state == "failed" and failed.detail == "exit status 1: unetlm: error: the disk is full"


def kill_mid_run(sweep: SweepDir, name: str, job) -> None:
    """Once the run has a checkpoint, send submitit's warning signal to the job's task (as Slurm would)."""
    deadline = time.monotonic() + 120
    while (sweep.saved_step(name) or 0) < 2:
        assert time.monotonic() < deadline and job.state == "RUNNING", "the run never saved a checkpoint"
        time.sleep(0.05)
    from unetlm.sweep.command import _children

    (task,) = _children(job._process.pid)  # the controller's one task: python -m submitit.core._submit
    os.kill(task, signal.SIGUSR2)


@needs_submitit
def test_a_job_killed_mid_run_is_requeued_and_ends_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path):
    from unetlm.api import load_checkpoint
    from unetlm.sweep.slurm import submit
    from unetlm.train.loop import train

    recipe, corpus = tiny
    path = write_sweep(tmp_path / "k.toml", recipe, corpus, set=["training.steps=24", "training.checkpoint_every=2",
                                                                 "training.eval_every=24"])
    planned = plan_sweep(load_sweep(path), tmp_path / "out")
    sweep = SweepDir.create(planned.root, planned.spec, planned.runs, planned.data)
    (run,) = sweep.runs
    (job,) = submit(sweep, [run], cluster="local")
    assert sweep.job(run.name)["job_id"] == str(job.job_id)
    kill_mid_run(sweep, run.name, job)
    assert job.result() == f"{run.name}: finished"
    attempts = sweep.job(run.name)["attempts"]
    assert len(attempts) == 2 and attempts[0]["exit"].startswith("requeued") and attempts[1]["exit"] == 0
    assert sweep.finished(run)
    reference = tmp_path / "reference"
    train(run.recipe(), reference, progress=False)
    got, want = load_checkpoint(sweep.run_dir(run.name))[0].state_dict(), load_checkpoint(reference)[0].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


@needs_submitit
def test_submitit_debug_executor_runs_jobs_and_reports_failures(tiny, tmp_path, monkeypatch):
    import pdb

    from unetlm.sweep.slurm import submit

    monkeypatch.setattr(pdb, "post_mortem", lambda *a: None)  # the debug executor's debugger on a failure
    recipe, corpus = tiny
    path = write_sweep(tmp_path / "d.toml", recipe, corpus, set=["training.steps=2", "training.eval_every=2"],
                       grid={"training.lr": [3e-3, 1e30]})
    planned = plan_sweep(load_sweep(path), tmp_path / "out")
    sweep = SweepDir.create(planned.root, planned.spec, planned.runs, planned.data)
    good, bad = submit(sweep, sweep.runs, cluster="debug")
    assert good.result() == "tiny-lr=0.003: finished"
    with pytest.raises(Exception, match="tiny-lr=1e30: exit status 1: unetlm: error: "):
        bad.result()
    assert [s.state for s in sweep_status(sweep)] == ["done", "failed"]


def test_paired_bootstrap_sees_a_small_consistent_difference_that_separate_intervals_miss():
    rng = np.random.default_rng(0)
    hard = rng.uniform(1.0, 3.0, size=200)  # blocks differ a lot in difficulty, for both models alike
    sizes = np.full(200, 100.0)
    a, b = hard * 100 * 0.99, hard * 100
    diff, low, high = paired_bootstrap_ci(a, sizes, b, sizes)
    assert high < 0 and diff == pytest.approx(-0.01 * hard.mean(), rel=1e-6)
    same = paired_bootstrap_ci(b, sizes, b, sizes)
    assert same == (0.0, 0.0, 0.0)


def test_power_laws_and_their_crossover():
    flops = np.array([1e12, 2e12, 4e12, 8e12, 1e12, 2e12, 4e12, 8e12])
    noise = np.array([1.01, 0.99, 1.0, 1.005, 0.995, 1.0, 1.01, 0.99])
    a = fit_power_law("a", list(flops), list(3.0 * flops ** -0.05 * noise))
    b = fit_power_law("b", list(flops), list(6.0 * flops ** -0.075 * noise))
    assert a.alpha_ci[0] < 0.05 < a.alpha_ci[1] and a.alpha == pytest.approx(0.05, abs=0.01)
    cross = crossover(a, b)
    exact = np.exp(np.log(2.0) / 0.025)
    assert cross.flops == pytest.approx(exact, rel=0.5) and cross.better_below == "a"
    assert cross.ci[0] < cross.flops < cross.ci[1]
    assert fit_power_law("one budget", [1e12, 1e12], [2.0, 2.1]) is None
    two = fit_power_law("two", [1e12, 2e12], [2.0, 1.9])
    assert two.alpha_ci is None and two.band([1e12]) is None


def test_pairs_differ_in_one_axis_and_seeds_spread():
    from unetlm.sweep.report import paired_differences, seed_spread

    rng = np.random.default_rng(1)
    bits = rng.uniform(100, 300, size=50)

    def row(pooler, up, seed, scale):
        labels = {"recipe": "au3", "pooler": pooler, "upsampler": up, "seed": str(seed)}
        return {"name": f"{pooler}-{up}-{seed}", "labels": labels, "config": f"{pooler}-{up}", "budget": 1e12,
                "bpb": scale * bits.sum() / 5000, "block_bits": list(bits * scale), "block_bytes": [100.0] * 50}

    rows = [row(p, u, s, 1.0 + 0.01 * (p == "mean") + 0.001 * s) for p in ("select", "mean")
            for u in ("linear", "multi") for s in (0, 1)]
    pairs = paired_differences(rows)
    assert len(pairs) == 8  # the square's 4 edges, per seed; never across seeds or two axes at once
    assert all(p["a"].endswith(p["b"][-2:]) for p in pairs)
    pooler = [p for p in pairs if p["axis"] == "pooler"]
    assert all(p["ci"][1] < 0 and p["verdict"].endswith("better") for p in pooler)  # select beats mean everywhere
    spread = {s["config"]: s for s in seed_spread(rows)}
    assert spread["mean-linear"]["seeds"] == 2 and spread["mean-linear"]["sd"] > 0
