"""Two CPU processes under torchrun (gloo, FSDP2, micro-batches) train like one process on the same global batch,
also when they resume a run that one process started."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from strategies import ROOT
from test_train import interrupt_at, losses, tiny_recipe, tiny_recipe_dict, write_corpus
from unetlm.api import load_checkpoint
from unetlm.recipe import dump_recipe
from unetlm.train import loop
from unetlm.train.checkpoint import CHECKPOINT, load_state


def torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    # the processes import this checkout's unetlm, wherever the installed package points
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "unetlm.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "corpus")
    recipe = tiny_recipe(corpus, threads=1)
    recipe_file = root / "tiny.toml"  # two processes of 2 rows each, 1 row per forward: gradients accumulate
    micro = tiny_recipe(corpus, threads=1, micro_batch_size=1)
    recipe_file.write_text(dump_recipe(micro), encoding="utf-8")
    # steps 1-3 in one process (stopped as Ctrl-C would), then resumed by two: the same bytes as one run
    with pytest.MonkeyPatch.context() as m:
        interrupt_at(m, 3)
        loop.train(micro, root / "two", progress=False, sample=False)
    assert load_state(root / "two" / CHECKPOINT)["data"]["world_size"] == 1
    args = ["train", str(recipe_file), "--out", str(root / "two"), "--resume", "--quiet", "--no-compile"]
    done = torchrun(args, root)
    assert done.returncode == 0, done.stderr[-3000:]
    loop.train(recipe, root / "one", progress=False, sample=False)
    return root, recipe, done


def test_two_processes_match_one(runs):
    root, _, _ = runs
    one, two = losses(root / "one"), losses(root / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step


def test_sharded_checkpoint_is_a_full_state_dict(runs):
    root, recipe, _ = runs
    model_two, _ = load_checkpoint(root / "two" / CHECKPOINT)
    model_one, _ = load_checkpoint(root / "one" / CHECKPOINT)
    for (name, a), (_, b) in zip(model_one.state_dict().items(), model_two.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), name
    state = load_state(root / "two" / CHECKPOINT)
    assert state["data"]["world_size"] == 2
    # a checkpoint written by two processes resumes in one (more steps: the schedule is stretched)
    longer = tiny_recipe(recipe.data.paths[0], threads=1, steps=7, micro_batch_size=1)
    result = loop.train(longer, root / "two", resume=True, progress=False, sample=False)
    assert result["step"] == 7


def test_recipe_error_is_reported_once(tmp_path):
    bad = tiny_recipe_dict("x")
    bad["training"]["lr"] = "fast"
    import tomli_w

    (tmp_path / "bad.toml").write_text(tomli_w.dumps(bad), encoding="utf-8")
    done = torchrun(["train", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "run")], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("training.lr = 'fast' is invalid") == 1
