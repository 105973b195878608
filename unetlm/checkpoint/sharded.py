"""Sharded checkpoint directories: torch.distributed.checkpoint (DCP) with a manifest, read safely.

A directory holds every rank's shards (``__RANK_N.distcp``), the ``.metadata`` index and, written
last, ``manifest.json`` (:mod:`unetlm.checkpoint.manifest`). Each rank hashes the shard files it
wrote, in the thread that wrote them (the background one when the save is asynchronous); the
coordinating rank writes the manifest once the index is on disk. DCP reshards on load, so a
directory written by any number of processes reads into any other.

Reading checks the manifest (sizes; hashes when asked), then that every shard file the index
names is long enough for its items, and runs no code from the files: the index is unpickled
through :mod:`unetlm.checkpoint.safe`'s class list, stored values with ``weights_only=True``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import pickle
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.futures import Future

from unetlm.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from unetlm.checkpoint.manifest import MANIFEST, check_files, file_record, read_manifest, write_manifest
from unetlm.checkpoint.safe import first_line, load_plain, read_index, refusal
from unetlm.checkpoint.shapes import check_shapes
from unetlm.core.errors import RunError

# one process saves and loads without a process group, as asked (no_dist); DCP warns about it all the same
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

METADATA = ".metadata"
KIND = "unetlm-checkpoint"


class ShardWriter(FileSystemWriter):
    """DCP's file writer that hashes each rank's files and ends with the manifest."""

    def __init__(self, directory: Path, step: int, recipe_sha256: str) -> None:
        super().__init__(directory)
        self.step, self.recipe_sha256 = step, recipe_sha256

    def write_data(self, plan, planner):
        results = super().write_data(plan, planner).wait()
        names = {r.storage_data.relative_path for r in results}
        records = {name: file_record(Path(self.path) / name) for name in names}
        future = Future()
        future.set_result([dataclasses.replace(r, storage_data=(r.storage_data, records)) for r in results])
        return future

    def finish(self, metadata, results) -> None:
        records, plain = {}, []
        for rank_results in results:
            for result in rank_results:
                records.update(result.storage_data[1])
            plain.append([dataclasses.replace(r, storage_data=r.storage_data[0]) for r in rank_results])
        super().finish(metadata, plain)
        directory = Path(self.path)
        records[METADATA] = file_record(directory / METADATA)
        write_manifest(directory, records, KIND, self.step, self.recipe_sha256)


def write_shards(state: dict, directory: Path, distributed: bool, step: int, recipe_sha256: str, async_group=None):
    """Each rank writes its shards of ``state`` into ``directory``; with ``async_group`` (a process
    group, or True in one process) the tensors are staged and written in the background: returns
    the future to wait on, else None once written."""
    writer = ShardWriter(directory, step, recipe_sha256)
    try:
        if async_group is not None:
            group = None if async_group is True else async_group
            return dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=not distributed)
        dcp.save(state, storage_writer=writer, no_dist=not distributed)
    except CheckpointException as exc:
        raise save_failure(directory, exc) from None
    return None


def wait_written(future, directory: Path) -> None:
    """Wait for a background :func:`write_shards`; its failure as :func:`save_failure`'s error."""
    try:
        getattr(future, "upload_completion", future).result()
    except CheckpointException as exc:
        raise save_failure(directory, exc) from None


def save_failure(directory: Path, exc: CheckpointException) -> RunError:
    """One line for a failed save (DCP gathers every rank's errors; e.g. a full disk)."""
    error = next(iter(exc.failures.values()))[0]
    return RunError(f"saving {directory} failed ({type(error).__name__}: {first_line(error)}); "
                    f"the committed checkpoints are kept")


def is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` is meant as a checkpoint directory (its index or manifest is there)."""
    return (directory / METADATA).is_file() or (directory / MANIFEST).is_file()


def check_directory(directory: Path, verify: bool = False):
    """The index of the checkpoint ``directory``, once its files are checked: the manifest's sizes
    (and sha256 with ``verify``), and every shard file the index names long enough for its items."""
    manifest = read_manifest(directory)
    if manifest is not None:
        check_files(directory, manifest, verify)
    if not (directory / METADATA).is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {METADATA} is missing")
    metadata = read_index(directory / METADATA)
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(ends.items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"shard file {name} is missing")
        elif path.stat().st_size < end:
            problems.append(f"{name} is cut at {path.stat().st_size:,} bytes, its items need {end:,}")
    if problems:
        raise CheckpointError(f"{directory} is incomplete: {'; '.join(problems)}")
    return metadata


class _SafeReader(FileSystemReader):
    """Hands DCP the index already read (and checked) instead of unpickling it again."""

    def __init__(self, directory: Path, metadata) -> None:
        super().__init__(directory)
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs):
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor values (numbers, strings, lists) read with ``weights_only=True``."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = load_plain(value, f"{self.directory} (item {fqn})")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def flat_items(state: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, leaf) of a nested dict, in order, as DCP names them."""
    out = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        out += flat_items(value, name + ".") if isinstance(value, dict) and value else [(name, value)]
    return out


def check_fits(state: dict, metadata, directory: Path) -> None:
    """An error naming what ``directory`` lacks for ``state``, or its first tensor whose shape differs."""
    stored = metadata.state_dict_metadata
    lacking = [k for k, _ in flat_items(state) if k not in stored and not any(s.startswith(k + ".") for s in stored)]
    if lacking:
        shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
        raise CheckpointError(f"checkpoint {directory} lacks {shown}: it was written for another model or format")
    tensors = {k: list(v.shape) for k, v in flat_items(state) if hasattr(v, "shape")}
    sizes = {k: list(stored[k].size) for k in tensors if isinstance(stored.get(k), TensorStorageMetadata)}
    check_shapes(tensors, sizes, f"checkpoint {directory}", "the model")


def read_into(state: dict, directory: Path, distributed: bool) -> None:
    """Fill ``state`` (a template: the keys and tensors, sharded or not, to read into) from the
    checkpoint ``directory`` in place; one error naming the damaged or missing file otherwise."""
    metadata = check_directory(directory)
    check_fits(state, metadata, directory)
    try:
        dcp.load(state, storage_reader=_SafeReader(directory, metadata), planner=_SafePlanner(directory),
                 no_dist=not distributed)
    except CheckpointException as exc:  # DCP gathers every rank's errors: report one plainly
        errors = [error for error, _trace in exc.failures.values()]
        raise _read_failure(directory, errors) from None


def _read_failure(directory: Path, errors: list[BaseException]) -> CheckpointError:
    """The one error to report for a failed read: a refusal first, then the file the manifest
    finds damaged, then the first error as it is."""
    errors = [refusal(e, str(directory)) if isinstance(e, pickle.UnpicklingError) else e for e in errors]
    unsafe = next((e for e in errors if isinstance(e, UnsafeCheckpointError)), None)
    if unsafe is not None:
        return unsafe
    manifest = read_manifest(directory)
    if manifest is not None:
        check_files(directory, manifest, verify=True)  # raises naming the damaged file, if one is
    error = next((e for e in errors if isinstance(e, CheckpointError)), errors[0])
    if isinstance(error, CheckpointError):
        return error
    return CheckpointError(f"{directory} is damaged: {type(error).__name__}: {first_line(error)}")


def read_train_state(directory: Path) -> dict:
    """The small ``train`` record of a checkpoint (step, recipe, tokenizer, ...), without the weights."""
    state = {"train": ""}
    read_into(state, directory, distributed=False)
    try:
        record = json.loads(state["train"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory} is damaged: its train record is not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{directory} is damaged: its train record is not a JSON object")
    return record
