"""Writing one unit of input as shards: token ids, document index, bit-packed boundary masks, manifest last.

A unit's documents arrive as pieces (:mod:`unetlm.data.sources`). Documents held in one piece
are gathered into groups of about :data:`GROUP_BYTES` and split together (an entropy model runs
over many documents' windows per forward); a longer document is split piece by piece, its
splitters' scans and the tokenizer carrying their state from one piece to the next
(:class:`~unetlm.splitters.splitting.ChainScan`), so memory stays O(piece) however long it is.
The unit's stream is cut into shards (parts ``0, 1, ...``) of about ``shard_bytes`` stream bytes,
between pieces, so one document may span many shards; the last part's manifest says it is last.

A shard is written into a temporary folder next to its final place and renamed when complete,
so a shard folder either holds a whole shard or does not exist. Every byte goes through
:func:`write_bytes` (one place to see a full disk); on any failure the temporary folder and the
unit's shards written so far are removed, and a full disk becomes a :class:`PreparedDataError`
naming the file.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from unetlm.core.tokens import BYTES
from unetlm.data.prepared.format import (
    DOCS, FORMAT, MANIFEST, VERSION, PreparedDataError, mask_file, shard_dir, token_file, unit_shards,
    write_json_atomic,
)
from unetlm.splitters.splitting import ChainScan, split_document

GROUP_BYTES = 4 << 20  # documents held in one piece are tokenized and split in groups of about this many bytes


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


class Encoder:
    """A document's token ids from its pieces: bytes as they are; a BPE tokenizer's ids of the text
    up to the last place where cutting cannot change them (:meth:`BpeTokenizer.safe_cut`), the rest
    carried to the next piece, so the ids equal those of the whole document."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.carry = tokenizer, b""

    def feed(self, data: bytes, end: bool) -> np.ndarray:
        if self.tokenizer is BYTES:
            return np.frombuffer(data, dtype=np.uint8)
        text = self.carry + data
        cut = len(text) if end else self.tokenizer.safe_cut(text)
        self.carry = text[cut:]
        return self.tokenizer.encode(text[:cut])


class _Shard:
    """One shard being written in its temporary folder: the stream's tokens, BOS offsets and masks."""

    def __init__(self, out: Path, unit: int, part: int, n_masks: int, dtype) -> None:
        self.final = shard_dir(out, unit, part)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.dtype, self.current = dtype, self.tmp
        self.tokens = _File(self.tmp / token_file(dtype))
        self.masks = [_BitFile(self.tmp / mask_file(s + 1)) for s in range(n_masks)]
        self.bos: list[tuple[int, int]] = []  # (token, stream byte) offset of each document's BOS
        self.n_tokens = self.n_bytes = 0

    def write(self, bos: bool, ids: np.ndarray, masks: np.ndarray | None, n_bytes: int) -> None:
        """A document's start (``bos``) and/or its next ``n_bytes`` bytes, as ``ids`` and ``masks``."""
        if bos:
            self.bos.append((self.n_tokens, self.n_bytes))
        self.current = self.tokens.path
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        for mask, bits in zip(self.masks, masks if masks is not None else ()):
            self.current = mask.path
            mask.write_bits(np.concatenate([[True], bits]) if bos else bits)  # a BOS is a boundary at every stage
        self.n_tokens += len(ids) + bos
        self.n_bytes += n_bytes + bos

    def close(self, header: dict, last: bool, continues: bool) -> dict:
        self.current = self.tmp / DOCS
        docs = _File(self.current)
        docs.write(np.asarray(self.bos, dtype=np.int64).reshape(-1, 2).tobytes())
        files = [f.close() for f in (self.tokens, docs, *self.masks)]
        manifest = header | {
            "format": FORMAT,
            "version": VERSION,
            "last": last,
            "continues": continues,
            "num_tokens": self.n_tokens,
            "num_bytes": self.n_bytes,
            "num_documents": len(self.bos),
            "token_dtype": np.dtype(self.dtype).name,
            "files": files,
        }
        self.current = self.tmp / MANIFEST
        write_json_atomic(self.current, manifest)
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not (self.final / MANIFEST).is_file():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # another job finished the same shard first
        return manifest


def write_unit(
    out: Path,
    unit: int,
    pieces: Iterable[tuple[bytes, bool]],
    splitters: list,
    tokenizer,
    header: dict,
    shard_bytes: int,
    details: Callable[[], dict] = dict,
) -> list[dict]:
    """Write unit ``unit`` of ``out`` from its document pieces as shards of about ``shard_bytes``
    stream bytes; returns their manifests. ``header`` (the preparation's key, the unit's input, ...) and
    ``details()``, called once the pieces are read, are copied into the last manifest (the others
    get ``header``)."""
    dtype = token_dtype(tokenizer.vocab_size)
    manifests: list[dict] = []
    shard = _Shard(out, unit, 0, len(splitters), dtype)
    group: list[bytes] = []
    scan = encoder = None  # the open document's, when it spans pieces

    def room(open_document: bool) -> None:
        nonlocal shard
        if shard.n_bytes >= shard_bytes:
            part = len(manifests)
            manifests.append(shard.close(header | {"unit": unit, "part": part}, last=False, continues=open_document))
            shard = _Shard(out, unit, part + 1, len(splitters), dtype)

    def write_group() -> None:
        masks = document_masks(splitters, group) if splitters else [None] * len(group)
        for data, bits in zip(group, masks):
            room(False)
            shard.write(True, Encoder(tokenizer).feed(data, True), bits, len(data))
        group.clear()

    try:
        size = 0
        for data, end in pieces:
            if scan is None and end:  # a whole document
                group.append(data)
                size += len(data)
                if size >= GROUP_BYTES:
                    write_group()
                    size = 0
                continue
            if group:
                write_group()
                size = 0
            starts = scan is None
            if starts:
                scan, encoder = ChainScan(splitters), Encoder(tokenizer)
            room(not starts)
            shard.write(starts, encoder.feed(data, end), scan.feed(data) if splitters else None, len(data))
            if end:
                scan = encoder = None
        if group:
            write_group()
        last = header | details() | {"unit": unit, "part": len(manifests)}
        manifests.append(shard.close(last, last=True, continues=False))
        return manifests
    except BaseException as exc:
        shutil.rmtree(shard.tmp, ignore_errors=True)
        for folder in unit_shards(out, unit):
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PreparedDataError(
                f"no space left on the device while writing {shard.current} ({exc.strerror}); the unfinished shard "
                f"was removed, finished shards are kept: free space and rerun the same command to continue"
            ) from None
        raise
