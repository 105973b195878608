"""Two CPU processes under torchrun (gloo): FSDP2 + compiled, checkpointed blocks + micro-batches
train like one eager process, and their sharded checkpoint resumes on two processes and on one;
SIGTERM to one rank mid-run saves the current step on both, and the same command finishes the run;
a start builds only each rank's shards, with the weights and gradients of one process."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import unetlm
from test_train import losses, saved, tiny_recipe, tiny_recipe_dict, weights, write_corpus
from unetlm.checkpoint import store
from unetlm.checkpoint.manifest import read_manifest
from unetlm.checkpoint.sharded import check_directory
from unetlm.recipe import dump_recipe
from unetlm.train.metrics import read_metrics
from unetlm.train import loop

# dynamo and AOTAutograd as in real training, without inductor's slow C++ code generation
BACKEND = ">=0:aot_eager"
PARALLEL = dict(threads=1, steps=4, eval_every=2, checkpoint_every=2)
COMPILED = dict(PARALLEL, compile=True, activation_checkpointing=True, micro_batch_size=1, async_checkpoint=True)


def torchrun_command(args: list[str], program: tuple[str, ...] = ("-m", "unetlm.cli")) -> tuple[list[str], dict]:
    root = str(Path(unetlm.__file__).resolve().parents[1])  # the processes import the unetlm under test
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_OVERRIDE_BACKENDS": BACKEND,
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *program, *args]
    return command, env


def torchrun(args: list[str], cwd, program: tuple[str, ...] = ("-m", "unetlm.cli")) -> subprocess.CompletedProcess:
    command, env = torchrun_command(args, program)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def worker_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun worker ``rank`` started by the agent process ``agent`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == agent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "corpus")
    loop.train(tiny_recipe(corpus, **PARALLEL), root / "eager", progress=False, sample=False)  # uninterrupted
    recipe_file = root / "tiny.toml"  # two processes of 2 rows each, 1 row per forward: gradients accumulate
    recipe_file.write_text(dump_recipe(tiny_recipe(corpus, **COMPILED)), encoding="utf-8")
    first = torchrun(["train", str(recipe_file), "--out", str(root / "two"), "--quiet", "--stop-at", "2"], root)
    assert first.returncode == 0, first.stderr[-3000:]
    assert saved(root / "two")["step"] == 2 and saved(root / "two")["world_size"] == 2
    shutil.copytree(root / "two", root / "two-then-one")
    # resumed on two processes as HSDP (2 replicas of 1 shard) from shards written by plain FSDP2
    hsdp = ["--set", "training.shard_size=1", "--force"]
    again = torchrun(["train", str(recipe_file), "--out", str(root / "two"), "--quiet", "--resume", *hsdp], root)
    assert again.returncode == 0, again.stderr[-3000:]
    with torch._dynamo.config.patch(debug_backend_override=BACKEND):  # torch's own patch restores it whole
        loop.train(tiny_recipe(corpus, **COMPILED), root / "two-then-one", resume=True, progress=False, sample=False)
    return root


def test_sharded_compiled_run_resumed_on_two_and_on_one_equals_uninterrupted(runs):
    want = losses(runs / "eager")
    assert sorted(want) == [1, 2, 3, 4]
    for name in ("two", "two-then-one"):
        got = losses(runs / name)
        assert sorted(got) == [1, 2, 3, 4], name
        for step in want:
            assert got[step] == pytest.approx(want[step], abs=1e-4), (name, step)
    a, b, c = weights(runs / "eager"), weights(runs / "two"), weights(runs / "two-then-one")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4) and torch.allclose(a[key], c[key], atol=1e-4), key
    last = store.step_dir(runs / "two", 4)
    shards = sorted(p.name for p in last.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own
    # each rank hashed its own shards (in the background save); the manifest gathers them all
    assert sorted(read_manifest(last)["files"]) == [".metadata", *shards] and read_manifest(last)["step"] == 4
    check_directory(last, verify=True)


def test_recipe_error_is_reported_once(tmp_path):
    bad = tiny_recipe_dict("x")
    bad["training"]["lr"] = "fast"
    import tomli_w

    (tmp_path / "bad.toml").write_text(tomli_w.dumps(bad), encoding="utf-8")
    done = torchrun(["train", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "run")], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("training.lr = 'fast' is invalid") == 1


def late_rank_program(rank: int, seconds: float) -> tuple[str, ...]:
    """torchrun's program: the command line, started ``seconds`` late on rank ``rank``."""
    code = (f"import os, sys, time\nif os.environ['RANK'] == '{rank}': time.sleep({seconds})\n"
            "from unetlm.cli import main\nsys.exit(main(sys.argv[1:]))")
    return ("--no-python", sys.executable, "-c", code)


def test_an_error_every_rank_meets_is_reported_once_when_rank_0_meets_it_last(tmp_path):
    """torchrun ends the other ranks when one fails: rank 1 failing first must not silence rank 0."""
    done = torchrun(["train", "no-such-recipe.toml"], tmp_path, program=late_rank_program(0, 1.5))
    assert done.returncode != 0
    assert done.stderr.count("unetlm: error: ") == 1 and "no-such-recipe.toml" in done.stderr
    assert "(rank 1)" not in done.stderr


def test_an_error_of_one_rank_other_than_0_is_reported_with_its_rank(tmp_path):
    """Rank 0 still busy (never failing on its own), rank 1 fails: its error is written, naming it."""
    done = torchrun(["train", "no-such-recipe.toml"], tmp_path, program=late_rank_program(0, 120))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("unetlm: error: ")]
    assert len(lines) == 1 and lines[0].endswith("(rank 1)") and "no-such-recipe.toml" in lines[0]


def test_sigterm_to_one_rank_saves_the_current_step_and_the_same_command_finishes(runs):
    """SIGTERM to rank 1 alone: both ranks agree at the next step boundary, save that step (no
    checkpoint is otherwise due before the end) and exit 75; the same command again finishes a
    run equal to the uninterrupted one, each step once in metrics.jsonl."""
    recipe_file = runs / "preempt.toml"
    recipe_file.write_text(dump_recipe(tiny_recipe(str(runs / "corpus" / "*.txt"), **(PARALLEL | {"checkpoint_every": 100}))),
                           encoding="utf-8")
    out = runs / "preempted"
    command, env = torchrun_command(["train", str(recipe_file), "--out", str(out), "--quiet"])
    agent = subprocess.Popen(command, cwd=runs, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, rank1, signalled = time.monotonic() + 300, None, None
        while signalled is None and agent.poll() is None and time.monotonic() < deadline:
            rank1 = rank1 or worker_pid(agent.pid, 1)
            if rank1 and (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip():
                os.kill(rank1, signal.SIGTERM)  # after step 1: mid-run
                signalled = time.monotonic()
            time.sleep(0.02)
        output, _ = agent.communicate(timeout=300)
    finally:
        agent.kill()
    assert signalled is not None, output[-3000:]
    assert time.monotonic() - signalled < 25, "the ranks did not stop within a step and a save"
    assert agent.returncode != 0 and re.search(r"exitcode\s*:\s*75", output), output[-3000:]
    stopped = saved(out)["step"]
    assert 1 <= stopped < 4 and max(losses(out)) == stopped  # the step it stopped at, saved and recorded
    assert not (out / "checkpoint.tmp").exists()
    again = torchrun(["train", str(recipe_file), "--out", str(out), "--quiet"], runs)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]  # the resumed run's records follow the saved step's, none twice
    want, got = losses(runs / "eager"), losses(out)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-4), step
    a, b = weights(runs / "eager"), weights(out)
    assert all(torch.allclose(a[key], b[key], atol=1e-4) for key in a)


def test_start_shards_only_with_the_weights_and_gradients_of_one_process(tmp_path):
    """Two processes set up a ~250M-parameter run each below the model's fp32 size (no rank builds the
    whole model), start from the weights one process starts from, and on rows padded unevenly across
    ranks and micro-batches compute the one-process gradient (as FSDP2 and as HSDP): the loss is
    normalised by the step's global target count."""
    import start_worker
    from test_train import tiny_recipe_dict

    corpus = write_corpus(tmp_path / "corpus")
    tiny = tmp_path / "tiny.toml"  # 4 rows per rank in micro-batches of 2
    tiny.write_text(dump_recipe(tiny_recipe(corpus, batch_size=8, micro_batch_size=2, threads=1)), encoding="utf-8")
    big = tiny_recipe_dict(corpus, batch_size=2, threads=1)
    big["model"]["stages"][0]["dim"] = 256
    big["model"]["stages"][1].update(dim=1024, layers=20, mixer={"name": "attention", "head_dim": 64})
    from unetlm.recipe import recipe_from_dict

    with torch.device("meta"):
        fp32_bytes = 4 * sum(p.numel() for p in unetlm.build_model(recipe_from_dict(big)).parameters())
    assert 200e6 < fp32_bytes / 4 < 300e6
    big_file = tmp_path / "big.toml"
    big_file.write_text(dump_recipe(recipe_from_dict(big)), encoding="utf-8")
    worker = str(Path(start_worker.__file__))
    done = torchrun([str(tmp_path), str(tiny), str(big_file)], tmp_path, program=(worker,))
    assert done.returncode == 0, done.stderr[-3000:]
    start_worker.main(tmp_path, tiny)  # one process, here
    one, two = (torch.load(tmp_path / f"start-{n}.pt", weights_only=True) for n in (1, 2))
    assert len(two["peak_rss"]) == 2 and all(peak < fp32_bytes for peak in two["peak_rss"]), (two["peak_rss"], fp32_bytes)
    want = one["fsdp"]
    for layout in ("fsdp", "hsdp"):  # sharded over both ranks; 2 replicas, all-reduced in the last micro-batch
        got = two[layout]
        assert want["weights"].keys() == got["weights"].keys()
        for key, value in want["weights"].items():
            assert torch.equal(value, got["weights"][key]), (layout, key)
        assert want["grads"].keys() == got["grads"].keys() and len(want["grads"]) == len(want["weights"])
        for key, grad in want["grads"].items():
            assert torch.allclose(grad, got["grads"][key], rtol=1e-4, atol=1e-7), (layout, key)
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
