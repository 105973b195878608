"""Reading pickles without running code: DCP's metadata index (``.metadata``) through an explicit
list of classes, and stored values through torch's ``weights_only`` reader.

A pickle calls only what ``find_class`` hands it (``GLOBAL``, ``STACK_GLOBAL``, ``INST`` and the
extension opcodes all go through it; ``REDUCE``, ``NEWOBJ``, ``OBJ`` and ``BUILD`` call what is
already on the stack). So the index may name exactly the classes below, each by its module and
plain name: no dotted names (pickle protocol 4 would resolve ``os.system`` inside any allowed
module), no module-wide allowance, and every ``REDUCE`` target is one of them.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from unetlm.checkpoint.errors import CheckpointError, UnsafeCheckpointError

_DCP = "torch.distributed.checkpoint.metadata"
#: (module, name) of every class a DCP index is built from (torch 2.13), plus torch dtypes by name
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {(_DCP, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    )}
    | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # torch.layout's pickle: the layout named by a string
        ("collections", "OrderedDict"),
    }
    | {(module, name) for module in ("pathlib", "pathlib._local")  # StorageMeta.checkpoint_id
       for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")}
    | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP index admitting :data:`ALLOWED` only."""

    def __init__(self, file, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise UnsafeCheckpointError(
                f"refusing to load {self.where}: it names {module}:{name}, which is not part of a checkpoint "
                f"index; unpickling it could run code"
            )
        return super().find_class(module, name)


def read_index(path: Path):
    """The DCP ``Metadata`` pickled in ``path``, read without running code."""
    with path.open("rb") as f:
        try:
            return MetadataUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path} is damaged: {type(exc).__name__}: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_plain(data: io.BytesIO | Path, where: str):
    """A value saved with ``torch.save`` read with ``weights_only=True`` (tensors and plain data);
    a refusal names ``where`` and what was refused, without torch's advice to read it unsafely."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refusal(exc, where) from None


def refusal(exc: BaseException, where: str) -> CheckpointError:
    """The error for a failed ``weights_only`` read: unsafe when torch refused a global (code),
    else damage (foreign or cut bytes)."""
    reason = weights_only_reason(exc)
    if "GLOBAL" in reason or "global" in reason:
        return UnsafeCheckpointError(f"refusing to load {where}: it is not plain data and could run code ({reason})")
    return CheckpointError(f"{where} is damaged: {reason}")


def weights_only_reason(exc: BaseException) -> str:
    """What torch's ``weights_only`` reader refused, without its advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
    useful = [line for line in lines if not line.startswith(skip)]
    if not useful:  # the reason sits after the advice on the same line
        useful = [line.rpartition("WeightsUnpickler error:")[2].strip() for line in lines if "WeightsUnpickler" in line]
    return next((line for line in useful if line), type(exc).__name__)
