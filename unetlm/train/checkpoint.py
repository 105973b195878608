"""Sharded checkpoints: torch.distributed.checkpoint (DCP) directories, written atomically, read safely.

``RUN_DIR/checkpoint/`` is one DCP directory: every rank writes its own shards
(``__RANK_0.distcp``) and rank 0 the ``.metadata`` index. Its state dict has three keys:

- ``model``: parameter name -> tensor (DTensor shards under FSDP2; DCP reshards on load, so a
  checkpoint resumes on any number of processes);
- ``optimizer``: the optimizer state keyed by parameter name (``torch.distributed.checkpoint.state_dict``);
- ``train``: JSON text: ``step``, ``scheduler``, ``rng``, ``recipe`` (the resolved recipe as a
  dict), ``tokenizer`` (JSON text, or null for byte models), ``world_size``.

Saving writes ``RUN_DIR/checkpoint.tmp/``; once it is complete, rank 0 moves the previous
checkpoint to ``checkpoint.prev/``, renames the new one to ``checkpoint/`` and deletes the old.
A kill at any moment leaves one complete checkpoint (``checkpoint/``, or between the two renames
``checkpoint.prev/``, which readers fall back to).

Reading runs no code from the files: the metadata is unpickled admitting DCP's own metadata
classes only, and every stored value is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from unetlm.train.errors import CheckpointError

# one process saves and loads without a process group, as asked (no_dist); DCP warns about it all the same
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

CHECKPOINT = "checkpoint"
TEMPORARY = "checkpoint.tmp"
PREVIOUS = "checkpoint.prev"
METADATA = ".metadata"


def is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` is a complete DCP checkpoint (its index is written last)."""
    return (directory / METADATA).is_file()


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of a run directory (or ``run_dir`` itself if it is one), else None."""
    run_dir = Path(run_dir)
    for directory in (run_dir, run_dir / CHECKPOINT, run_dir / PREVIOUS):
        if is_checkpoint(directory):
            return directory
    return None


# --- writing ---------------------------------------------------------------------------------

def begin_write(run_dir: Path, main: bool) -> Path:
    """An empty temporary checkpoint directory (made by the main rank; the caller then synchronises)."""
    tmp = run_dir / TEMPORARY
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


def write_shards(state: dict, directory: Path, distributed: bool, async_group=None):
    """Each rank writes its shards of ``state`` into ``directory``; with ``async_group`` (a process
    group, or True in one process) the tensors are staged and written in the background: returns
    the future to wait on, else None once written."""
    writer = FileSystemWriter(directory)
    if async_group is not None:
        group = None if async_group is True else async_group
        return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=not distributed)
    dcp.save(state, storage_writer=writer, no_dist=not distributed)
    return None


def commit(run_dir: Path) -> Path:
    """Main rank, after every shard and the index are written: the temporary checkpoint takes the
    place of the previous one (see the module docstring for why a kill here loses nothing)."""
    tmp, final, previous = run_dir / TEMPORARY, run_dir / CHECKPOINT, run_dir / PREVIOUS
    if not is_checkpoint(tmp):
        raise CheckpointError(f"{tmp} is incomplete (no {METADATA}); the previous checkpoint is kept")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading without running code ------------------------------------------------------------

_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP index, admitting only DCP's metadata classes, torch dtypes and sizes, paths."""

    def find_class(self, module: str, name: str):
        allowed = (
            module == "torch.distributed.checkpoint.metadata"
            or (module, name) in _ALLOWED
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise CheckpointError(
                f"refusing to load: the checkpoint index refers to {module}.{name}, which is not part of "
                f"a checkpoint and could run code"
            )
        return super().find_class(module, name)


def read_metadata(directory: Path):
    """The DCP index of ``directory``, unpickled safely; an error if it or any shard file is missing."""
    path = directory / METADATA
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {METADATA} is missing")
    with path.open("rb") as f:
        try:
            metadata = _MetadataUnpickler(f).load()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path} is unreadable: {type(exc).__name__}: {exc}") from None
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: shard file(s) {', '.join(missing)} missing "
            f"(it has {len(files) - len(missing)} of {len(files)})"
        )
    return metadata


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata(Path(self.path))
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor values (numbers, strings, lists) read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"refusing to load {read_item.dest_index.fqn}: it is not plain data and could run code "
                f"({str(exc).splitlines()[0]})"
            ) from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def flat_keys(state: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        out += flat_keys(value, name + ".") if isinstance(value, dict) and value else [name]
    return out


def read_into(state: dict, directory: Path, distributed: bool) -> None:
    """Fill ``state`` (a template: the keys and tensors, sharded or not, to read into) from the
    checkpoint ``directory`` in place; an error naming what the checkpoint lacks."""
    metadata = read_metadata(directory)
    stored = set(metadata.state_dict_metadata)
    lacking = [k for k in flat_keys(state) if k not in stored and not any(s.startswith(k + ".") for s in stored)]
    if lacking:
        shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        raise CheckpointError(f"checkpoint {directory} lacks {shown}: it was written for another model or format")
    try:
        dcp.load(state, storage_reader=_SafeReader(directory), planner=_SafePlanner(), no_dist=not distributed)
    except CheckpointException as exc:  # DCP gathers every rank's errors: report ours plainly
        for error, _trace in exc.failures.values():
            if isinstance(error, CheckpointError):
                raise error from None
        raise


def read_train_state(directory: Path) -> dict:
    """The small ``train`` record of a checkpoint (step, recipe, tokenizer, ...), without the weights."""
    state = {"train": ""}
    read_into(state, directory, distributed=False)
    return json.loads(state["train"])


# --- random number generators as plain data --------------------------------------------------

def rng_state() -> dict:
    """Every generator's state as JSON-ready lists."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
