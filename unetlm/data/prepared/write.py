"""Writing one shard: token ids, document index, bit-packed boundary masks, manifest last.

A shard is written into a temporary folder next to its final place and renamed when complete,
so a shard folder either holds a whole shard or does not exist. Every byte goes through
:func:`write_bytes` (one place to see a full disk); on any failure the temporary folder is
removed and a full disk becomes a :class:`PreparedDataError` naming the file.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from unetlm.data.prepared.format import (
    DOCS, FORMAT, MANIFEST, VERSION, PreparedDataError, mask_file, shard_dir, token_file, write_json_atomic,
)
from unetlm.splitters.splitting import split_document

GROUP_BYTES = 4 << 20  # documents are tokenized and split in groups of about this many bytes


def write_bytes(f, data: bytes) -> None:
    f.write(data)


def token_dtype(vocab_size: int):
    """Smallest unsigned type holding a token of the documents: bytes uint8, BPE ids uint16/uint32."""
    if vocab_size <= 258:
        return np.uint8  # documents hold bytes only; BOS is implicit
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class _File:
    """A file written in pieces, with its size and sha256 kept as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "wb")
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        write_bytes(self.f, data)
        self.size += len(data)
        self.digest.update(data)

    def close(self) -> dict:
        self.f.close()
        return {"file": self.path.name, "bytes": self.size, "sha256": self.digest.hexdigest()}


class _BitFile(_File):
    """Bits written in pieces and packed 8 to a byte (``np.packbits``, big-endian bit order)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.rest = np.zeros(0, dtype=bool)

    def write_bits(self, bits: np.ndarray) -> None:
        bits = np.concatenate([self.rest, bits])
        whole = len(bits) // 8 * 8
        self.write(np.packbits(bits[:whole]).tobytes())
        self.rest = bits[whole:]

    def close(self) -> dict:
        if len(self.rest):
            self.write(np.packbits(self.rest).tobytes())
        return super().close()


def document_masks(splitters, documents: list[bytes]) -> list[np.ndarray]:
    """Each document's (n_splitters, len) boundary masks, computed over the whole document (an
    entropy model runs over all the documents' windows in batches)."""
    per_document = [splitter.for_documents(documents) for splitter in splitters]
    return [split_document([p[i] for p in per_document], data) for i, data in enumerate(documents)]


def _groups(documents: Iterable[bytes]) -> Iterable[list[bytes]]:
    group, size = [], 0
    for data in documents:
        group.append(data)
        size += len(data)
        if size >= GROUP_BYTES:
            yield group
            group, size = [], 0
    if group:
        yield group


def write_shard(
    out: Path,
    index: int,
    documents: Iterable[bytes],
    splitters: list,
    tokenizer,
    header: dict,
    details: Callable[[], dict] = dict,
    on_bytes: Callable[[int], None] | None = None,
) -> dict:
    """Write shard ``index`` of ``out`` from ``documents``; returns its manifest.

    ``header`` (the plan's key, the shard's input, ...) and ``details()``, called once the
    documents are read, are copied into the manifest.
    """
    final = shard_dir(out, index)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    current = tmp
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        tokens = _File(tmp / token_file(dtype))
        masks = [_BitFile(tmp / mask_file(s + 1)) for s in range(len(splitters))]
        index_rows: list[tuple[int, int]] = []
        n_tokens = n_bytes = 0
        for group in _groups(documents):
            group_masks = document_masks(splitters, group) if splitters else None
            for i, data in enumerate(group):
                ids = tokenizer.encode(data)
                index_rows.append((n_tokens, n_bytes))
                n_tokens += len(ids) + 1
                n_bytes += len(data) + 1
                current = tokens.path
                tokens.write(np.asarray(ids, dtype=dtype).tobytes())
                for mask, bits in zip(masks, group_masks[i] if group_masks is not None else ()):
                    current = mask.path
                    mask.write_bits(np.concatenate([[True], bits]))  # the BOS is a boundary at every stage
            if on_bytes is not None:
                on_bytes(sum(len(d) for d in group))
        current = tmp / DOCS
        docs = _File(current)
        docs.write(np.asarray(index_rows, dtype=np.int64).reshape(-1, 2).tobytes())
        files = [f.close() for f in (tokens, docs, *masks)]
        manifest = header | details() | {
            "format": FORMAT,
            "version": VERSION,
            "shard": index,
            "num_tokens": n_tokens,
            "num_bytes": n_bytes,
            "num_documents": len(index_rows),
            "token_dtype": np.dtype(dtype).name,
            "files": files,
        }
        current = tmp / MANIFEST
        write_json_atomic(current, manifest)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another job finished the same shard first
        return manifest
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PreparedDataError(
                f"no space left on the device while writing {current} ({exc.strerror}); the unfinished shard "
                f"was removed, finished shards are kept: free space and rerun the same command to continue"
            ) from None
        raise
