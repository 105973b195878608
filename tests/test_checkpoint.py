"""Checkpoints never run code on load, name what is missing, and save in the background."""
from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch

import unetlm
from test_train import tiny_recipe
from unetlm.train import checkpoint as fmt
from unetlm.train.checkpointer import Checkpointer
from unetlm.train.errors import CheckpointError
from unetlm.train.optim import make_optimizer, make_scheduler
from unetlm.train.distributed import World


class RunsCode:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def run(tmp_path):
    """A one-process run directory with a checkpoint at step 1, written in the background."""
    recipe = tiny_recipe("unused")
    torch.manual_seed(0)
    model = unetlm.build_model(recipe)
    optimizer = make_optimizer(model, recipe.training, 1e-3)
    scheduler = make_scheduler(optimizer, recipe.training)
    ckpt = Checkpointer(tmp_path / "run", World(0, 1, 0, torch.device("cpu")), async_save=True)
    ckpt.track(model, optimizer, scheduler, recipe, None, 2)
    ckpt.save(1)
    ckpt.close()
    return tmp_path / "run", model


def test_run_directory_loads_the_saved_weights(run):
    path, model = run
    loaded, recipe = unetlm.load_checkpoint(path)
    assert recipe.name == "tiny" and fmt.read_train_state(path / "checkpoint")["step"] == 1
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_missing_shard_is_named(run):
    path, _ = run
    (path / "checkpoint" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: shard file\(s\) __0_0.distcp missing"):
        unetlm.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        unetlm.load_checkpoint(path.parent)


def test_code_in_a_single_file_checkpoint_is_refused(tmp_path):
    marker, bad = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"model": {}, "recipe": RunsCode(marker)}, bad)
    with pytest.raises(CheckpointError, match="refusing to load .*could run code"):
        unetlm.load_checkpoint(bad)
    assert not marker.exists()


def test_code_in_a_sharded_checkpoint_is_refused(run, tmp_path):
    path, _ = run
    marker = tmp_path / "ran"
    index = path / "checkpoint" / fmt.METADATA
    index.write_bytes(pickle.dumps(RunsCode(marker)))  # the index itself
    with pytest.raises(CheckpointError, match="refusing to load: .*posix.system"):
        unetlm.load_checkpoint(path)
    evil = tmp_path / "evil"  # a stored value
    fmt.write_shards({"train": RunsCode(marker)}, evil, distributed=False)
    with pytest.raises(CheckpointError, match="refusing to load train"):
        fmt.read_train_state(evil)
    assert not marker.exists()
    plain = tmp_path / "plain"
    fmt.write_shards({"train": json.dumps({"step": 3})}, plain, distributed=False)  # plain data reads
    assert fmt.read_train_state(plain) == {"step": 3}


def test_resuming_an_old_single_file_checkpoint_says_so(tmp_path):
    from unetlm.train import loop

    (tmp_path / "checkpoint.pt").write_bytes(b"old")
    with pytest.raises(loop.TrainingError, match="single-file checkpoint of an older unetlm"):
        loop.train(tiny_recipe("unused"), tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("content", [b"hello\n", b"", bytes(range(256)) * 4])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content):
    from unetlm.cli import main

    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    refused = "is not a unetlm checkpoint|refusing to load"  # bytes the safe unpickler rejects: the latter
    with pytest.raises(CheckpointError, match=refused):
        unetlm.load_checkpoint(path)
    assert main(["generate", str(path), "--prompt", "Hi", "--max-bytes", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unetlm: error: ") and err.count("\n") == 1 and re.search(refused, err)
