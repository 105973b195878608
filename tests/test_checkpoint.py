"""Checkpoints: step folders committed atomically and pruned, a manifest that tells a complete
checkpoint from a damaged one, falling back past damage loudly, and each damaged file one line."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unetlm
from test_train import tiny_recipe, write_corpus
from unetlm.checkpoint import store
from unetlm.checkpoint.errors import CheckpointError
from unetlm.checkpoint.manifest import MANIFEST, file_record, read_manifest
from unetlm.checkpoint.sharded import read_train_state
from unetlm.cli import main
from unetlm.core.errors import RunError
from unetlm.recipe import dump_recipe
from unetlm.train.checkpointer import Checkpointer
from unetlm.train.optim import make_optimizer, make_scheduler
from unetlm.train.distributed import World

TESTS = Path(__file__).resolve().parent


def make_run(path: Path, steps=(1,), keep: int = 2, async_save: bool = True, **training):
    """A one-process run directory with a checkpoint at each of ``steps`` (weights perturbed
    between them) and its ``recipe.toml``; returns the model as last saved."""
    corpus = write_corpus(path.parent / f"{path.name}-corpus", docs=2)  # train --resume prepares it first
    recipe = tiny_recipe(corpus, keep_checkpoints=keep, **training)
    torch.manual_seed(0)
    model = unetlm.build_model(recipe)
    optimizer = make_optimizer(model, recipe.training, 1e-3)
    scheduler = make_scheduler(optimizer, recipe.training)
    ckpt = Checkpointer(path, World(0, 1, 0, torch.device("cpu")), async_save=async_save)
    ckpt.track(model, optimizer, scheduler, recipe, None, 2)
    for step in steps:
        with torch.no_grad():
            model.head.weight.add_(step)
        ckpt.save(step)
    ckpt.close()
    (path / "recipe.toml").write_text(dump_recipe(recipe), encoding="utf-8")
    return model


@pytest.fixture
def run(tmp_path):
    """Checkpoints at steps 1 and 2 (the second written in the background)."""
    model = make_run(tmp_path / "run", steps=(1, 2))
    return tmp_path / "run", model


def step_folder(run_dir: Path, step: int) -> Path:
    return store.step_dir(run_dir, step)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unetlm: error: "), err
    assert "Traceback" not in err and "weights_only" not in err
    return lines[0]


def test_the_newest_checkpoint_is_read_and_the_layout_is_kept(run):
    path, model = run
    assert [s for s, _ in store.committed(path)] == [1, 2]
    loaded, recipe = unetlm.load_checkpoint(path, verify=True)
    assert recipe.name == "tiny" and read_train_state(step_folder(path, 2))["step"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    manifest = read_manifest(step_folder(path, 2))
    assert manifest["step"] == 2 and sorted(manifest["files"]) == [".metadata", "__0_0.distcp"]
    assert len(manifest["recipe_sha256"]) == 64


def test_keep_checkpoints_prunes_the_oldest_only_after_a_commit(tmp_path, monkeypatch):
    from unetlm.checkpoint import sharded

    make_run(tmp_path / "run", steps=(1, 2, 3), keep=2, async_save=False)
    assert [s for s, _ in store.committed(tmp_path / "run")] == [2, 3]
    real = sharded.ShardWriter.finish

    def fails(self, metadata, results):
        raise OSError("disk full")

    monkeypatch.setattr(sharded.ShardWriter, "finish", fails)  # step 4's save never commits
    with pytest.raises(RunError, match=r"step-0000004.tmp failed \(OSError: disk full\); the committed checkpoints are kept"):
        make_run(tmp_path / "run", steps=(4,), keep=2, async_save=False)
    assert [s for s, _ in store.committed(tmp_path / "run")] == [2, 3]  # nothing pruned
    monkeypatch.setattr(sharded.ShardWriter, "finish", real)
    make_run(tmp_path / "run", steps=(4,), keep=1, async_save=False)  # the leftover .tmp is cleared
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000004"]


def test_a_damaged_newest_checkpoint_falls_back_loudly(run, capsys):
    path, _ = run
    shard = step_folder(path, 2) / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    with torch.no_grad():
        older = make_run(path.parent / "again", steps=(1,)).state_dict()
    loaded, _ = unetlm.load_checkpoint(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in older.items())  # step 1's weights
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unetlm: warning: ")
    assert "__0_0.distcp has" in err and "the manifest says" in err and "falling back to" in err and "step-0000001" in err
    # asked for that folder itself, it is one error, and so is a run with nothing valid left
    assert main(["generate", str(step_folder(path, 2)), "--prompt", "x", "--max-bytes", "1"]) == 2
    assert "__0_0.distcp has" in one_error_line(capsys)
    shutil.rmtree(step_folder(path, 1))
    assert main(["export", str(path), "--out", str(path.parent / "out")]) == 2
    assert "is damaged: __0_0.distcp has" in one_error_line(capsys)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_valid(tmp_path):
    """SIGKILL while step 2's shards are on disk and its manifest is not: step 1 stays the checkpoint."""
    script = (
        f"import os, signal, sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from pathlib import Path\n"
        "from test_checkpoint import make_run\n"
        "from unetlm.checkpoint import sharded\n"
        f"run = Path({str(tmp_path / 'run')!r})\n"
        "make_run(run, steps=(1,), async_save=False)\n"
        "sharded.file_record = lambda path: os.kill(os.getpid(), signal.SIGKILL)\n"
        "make_run(run, steps=(2,), async_save=False)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step-0000002.tmp" / "__0_0.distcp").is_file()
    assert [s for s, _ in store.committed(tmp_path / "run")] == [1]
    assert store.latest(tmp_path / "run", read_train_state, verify=True)[1]["step"] == 1


def forge(directory: Path, name: str, data: bytes) -> None:
    """Replace ``name`` in a checkpoint folder and update its manifest to match, as an attacker would."""
    (directory / name).write_bytes(data)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][name] = file_record(directory / name)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_verify_catches_what_sizes_cannot(run, capsys):
    path, _ = run
    shard = step_folder(path, 2) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit pattern inside the stored tensors: same size
    shard.write_bytes(bytes(data))
    assert main(["generate", str(step_folder(path, 2)), "--prompt", "x", "--max-bytes", "1", "--verify"]) == 2
    assert "__0_0.distcp's sha256 differs from the manifest's" in one_error_line(capsys)
    assert main(["eval", str(step_folder(path, 2)), "--verify"]) == 2
    assert "sha256 differs" in one_error_line(capsys)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "__0_0.distcp").write_bytes(os.urandom((d / "__0_0.distcp").stat().st_size)),
     "__0_0.distcp's sha256 differs from the manifest's"),  # read fails, then the hashes name the file
    (lambda d: (d / MANIFEST).write_text("{not json"), "manifest.json is damaged"),
    (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    (lambda d: forge(d, ".metadata", os.urandom(300)), ".metadata is damaged"),
])
def test_each_damaged_checkpoint_file_is_one_line(run, capsys, damage, message):
    path, _ = run
    damage(step_folder(path, 2))
    for argv in (["generate", str(step_folder(path, 2)), "--prompt", "x", "--max-bytes", "1"],
                 ["export", str(step_folder(path, 2)), "--out", str(path.parent / "exported")]):
        assert main(argv) == 2
        assert message in one_error_line(capsys)


def test_resume_from_an_older_layout_run_is_read(run):
    """Runs of the previous layout (RUN_DIR/checkpoint/, no manifest) still load."""
    path, model = run
    legacy = path.parent / "legacy"
    legacy.mkdir()
    shutil.copytree(step_folder(path, 2), legacy / "checkpoint")
    (legacy / "checkpoint" / MANIFEST).unlink()
    loaded, _ = unetlm.load_checkpoint(legacy)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    shard = legacy / "checkpoint" / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)  # no manifest: the index still tells it is cut
    with pytest.raises(CheckpointError, match=r"incomplete: __0_0.distcp is cut at .* its items need"):
        unetlm.load_checkpoint(legacy)


def test_export_carries_a_manifest_follows_the_umask_and_refuses_a_mismatched_recipe(run, tmp_path, capsys):
    path, _ = run
    out = tmp_path / "shared"
    old = os.umask(0o022)
    try:
        assert main(["export", str(path), "--out", str(out), "--verify"]) == 0
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        "manifest.json": 0o644, "model.safetensors": 0o644, "recipe.toml": 0o644}
    assert out.stat().st_mode & 0o777 == 0o755
    assert read_manifest(out)["step"] == 2 and read_manifest(out)["format"] == "unetlm-export"
    unetlm.load_checkpoint(out, verify=True)
    # the recipe of another model beside these weights, manifest made to match: the first differing tensor
    text = (out / "recipe.toml").read_text().replace("dim = 32", "dim = 48")
    forge(out, "recipe.toml", text.encode())
    assert main(["generate", str(out), "--prompt", "x", "--max-bytes", "1"]) == 2
    line = one_error_line(capsys)
    assert re.search(r"model.safetensors does not fit .*recipe.toml: \S+ is \[\d+(, \d+)*\] in the file, "
                     r"\[\d+(, \d+)*\] in the model", line), line
    # a cut weights file: by the manifest, and without one by safetensors' header
    weights = out / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    assert main(["generate", str(out), "--prompt", "x", "--max-bytes", "1"]) == 2
    assert "model.safetensors has" in one_error_line(capsys)
    (out / MANIFEST).unlink()
    assert main(["generate", str(out), "--prompt", "x", "--max-bytes", "1"]) == 2
    assert "model.safetensors is damaged" in one_error_line(capsys)


def test_resuming_an_old_single_file_checkpoint_says_so(tmp_path):
    from unetlm.train import loop

    (tmp_path / "checkpoint.pt").write_bytes(b"old")
    corpus = write_corpus(tmp_path / "corpus", docs=2)  # the data is prepared before the run directory is read
    with pytest.raises(loop.TrainingError, match="single-file checkpoint of an older unetlm"):
        loop.train(tiny_recipe(corpus), tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("content", [b"hello\n", b"", bytes(range(256)) * 4])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is not a unetlm checkpoint"):
        unetlm.load_checkpoint(path)
    assert main(["generate", str(path), "--prompt", "Hi", "--max-bytes", "2"]) == 2
    assert "is not a unetlm checkpoint" in one_error_line(capsys)
