"""No file a command reads runs code: crafted pickles in a checkpoint's index are refused in one
line through every command that reads one (and a widened class list would let them through),
stored values and single files are read as plain data, and the other files (row plans, cached
entropies, tokenizers, recipes) are data only."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import unetlm
from crafted_pickles import corpus
from test_checkpoint import forge, make_run, one_error_line, step_folder
from unetlm.checkpoint import safe
from unetlm.checkpoint.errors import UnsafeCheckpointError
from unetlm.checkpoint.sharded import read_train_state, write_shards
from unetlm.cli import main


class RunsCode:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "run"
    make_run(path, steps=(1,), async_save=False)
    return path


def commands(run: Path, tmp: Path):
    """What users run on a run directory: each reads the checkpoint's index first."""
    yield "generate", lambda: main(["generate", str(run), "--prompt", "x", "--max-bytes", "1"])
    yield "export", lambda: main(["export", str(run), "--out", str(tmp / "exported")])
    yield "train --resume", lambda: main(["train", str(run / "recipe.toml"), "--out", str(run), "--resume", "--quiet"])
    yield "unetlm.load_checkpoint", lambda: unetlm.load_checkpoint(run)


def test_the_crafted_pickles_run_code_when_unpickled_naively(tmp_path):
    """The corpus has teeth: each payload runs its command under plain pickle."""
    marker = tmp_path / "ran"
    for name, data in corpus(marker):
        pickle.loads(data)
        assert marker.exists(), name
        marker.unlink()


def test_crafted_checkpoint_indexes_are_refused_in_one_line_by_every_command(run, tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = step_folder(run, 1)
    real = (folder / ".metadata").read_bytes()
    payloads = corpus(marker)
    assert len(payloads) >= 20
    try:
        for name, data in payloads:
            forge(folder, ".metadata", data)  # the attacker writes a manifest that matches
            for command, call in commands(run, tmp_path):
                if command == "unetlm.load_checkpoint":
                    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
                        call()
                else:
                    assert call() == 2, (name, command)
                    line = one_error_line(capsys)
                    assert "refusing to load" in line and "could run code" in line, (name, command, line)
                assert not marker.exists(), (name, command)
    finally:
        forge(folder, ".metadata", real)
    assert read_train_state(folder)["step"] == 1


def test_a_class_list_widened_to_whole_modules_lets_the_corpus_through(run, tmp_path, monkeypatch):
    """The mutation check: the refusals above come from the exact class list."""
    allowed_modules = {module for module, _ in safe.ALLOWED}

    class ModuleWide(safe.MetadataUnpickler):
        def find_class(self, module, name):
            if module in allowed_modules:
                return pickle.Unpickler.find_class(self, module, name)
            return super().find_class(module, name)

    monkeypatch.setattr(safe, "MetadataUnpickler", ModuleWide)
    marker = tmp_path / "ran"
    folder = step_folder(run, 1)
    real = (folder / ".metadata").read_bytes()
    through = []
    try:
        for name, data in corpus(marker):
            forge(folder, ".metadata", data)
            try:
                unetlm.load_checkpoint(run)
            except Exception:  # the payload's return value is no index
                pass
            if marker.exists():
                through.append(name)
                marker.unlink()
    finally:
        forge(folder, ".metadata", real)
    assert any(name.startswith("dotted") for name in through), through


def test_an_older_layout_index_is_refused_too(run, tmp_path, capsys):
    legacy = tmp_path / "legacy"
    shutil.copytree(step_folder(run, 1), legacy / "checkpoint")
    (legacy / "checkpoint" / "manifest.json").unlink()
    marker = tmp_path / "ran"
    (legacy / "checkpoint" / ".metadata").write_bytes(dict(corpus(marker))["dotted torch:os.system p4"])
    assert main(["generate", str(legacy), "--prompt", "x", "--max-bytes", "1"]) == 2
    assert "refusing to load" in one_error_line(capsys) and not marker.exists()


def test_stored_values_and_single_files_are_read_as_plain_data(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    write_shards({"train": RunsCode(marker)}, evil, distributed=False, step=1, recipe_sha256="")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*\(item train\): it is not plain data"):
        read_train_state(evil)
    single = tmp_path / "evil.pt"
    torch.save({"model": {}, "recipe": RunsCode(marker)}, single)
    assert main(["generate", str(single), "--prompt", "x", "--max-bytes", "1"]) == 2
    line = one_error_line(capsys)  # torch's refusal without its advice to load the file unsafely
    assert "refusing to load" in line and "GLOBAL posix.system" in line
    assert not marker.exists()
    plain = tmp_path / "plain"
    write_shards({"train": '{"step": 3}'}, plain, distributed=False, step=3, recipe_sha256="")
    assert read_train_state(plain) == {"step": 3}


def test_row_caches_and_cached_entropies_refuse_pickled_arrays(tmp_path, monkeypatch):
    from unetlm.data.rows import Rows
    from unetlm.splitters.entropy import EntropyConfig, EntropySplitter
    from entropy_example import ensure_example_checkpoint

    marker = tmp_path / "ran"
    crafted = np.array([RunsCode(marker)], dtype=object)
    plan = tmp_path / "plan.npz"
    np.savez(plan, starts=crafted, ends=crafted, cause=crafted)
    with pytest.raises(ValueError, match="allow_pickle"):  # the row cache then plans again
        Rows.load(plan)
    splitter = EntropySplitter(EntropyConfig(checkpoint=ensure_example_checkpoint(), cache_dir=str(tmp_path / "h")))
    data = b"cached entropies"
    want = splitter.entropies(data)
    (cached,) = (tmp_path / "h").glob("*.npy")
    np.save(cached, crafted)
    assert np.array_equal(splitter.entropies(data), want)  # a foreign cache file is computed again
    assert not marker.exists()


def test_tokenizer_and_recipe_files_are_data(run, tmp_path, capsys):
    pytest.importorskip("tokenizers")
    exported = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    capsys.readouterr()
    (exported / "tokenizer.json").write_text('{"vocab_size": 300, "bytes_per_token": 1.0, "tokenizer": "not json"}')
    from unetlm.checkpoint.trained import attach_tokenizer

    with pytest.raises(Exception, match=r"the tokenizer is damaged"):
        attach_tokenizer(unetlm.build_model(run / "recipe.toml"), (exported / "tokenizer.json").read_text(), "x")
    # a component is found by its registered name, never by an import path a recipe writes
    assert main(["show", str(run / "recipe.toml"), "--set", "model.stages[1].splitter={name='os:system'}"]) == 2
    assert "unknown splitter 'os:system'" in one_error_line(capsys)
