"""Reading prepared data: any token range of the stream, straight from memory-mapped shards.

RAM per process is O(documents) for the index plus O(read size); tokens and masks stay on
disk (``np.memmap``). The stream and its masks are exactly those of
:func:`unetlm.data.packing.pack` over the same documents, cut after the document that crosses
``data.max_bytes`` as :func:`unetlm.data.sources.load_documents` cuts it.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import attrs
import numpy as np

from unetlm.core.tokens import BOS, BYTES
from unetlm.data.packing import TokenStream
from unetlm.data.prepared.format import (
    DOCS, PREPARATION, TOKENIZER, PreparationIncomplete, PreparedDataError, check_version, code_change, file_digest,
    mask_file, open_shard, read_json, reprepare_hint, shard_dir, show, show_splitter, splitter_identities,
    stale_hint, token_file,
)

_OPEN_SHARDS = 16  # memory maps kept open per corpus
_TOKEN_BLOCK = 1 << 22  # tokens read at a time when walking one document


@attrs.define
class _Shard:
    folder: Path
    token_start: int  # global token offset of the shard's first token
    doc_start: int  # global id of its first BOS's document (a shard may start inside the one before)
    num_tokens: int  # tokens used (fewer than written when max_bytes cuts the shard)
    dtype: str
    files: list[dict]


class PreparedCorpus:
    """A prepared directory as one token stream ``BOS doc0 BOS doc1 ...`` with document ids and masks."""

    def __init__(self, path: Path, preparation: dict, shards: list[_Shard], doc_starts, doc_byte_starts, num_tokens,
                 num_bytes, tokenizer) -> None:
        self.path = path
        self.preparation = preparation
        self.shards = shards
        self.doc_starts = doc_starts
        self.doc_byte_starts = doc_byte_starts
        self.num_tokens = num_tokens
        self.num_bytes = num_bytes
        self.num_documents = len(doc_starts)
        self.num_masks = preparation["num_masks"]
        self.tokenizer = tokenizer
        self._shard_starts = np.array([s.token_start for s in shards], dtype=np.int64)
        self._maps: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path, recipe=None) -> "PreparedCorpus":
        """Open ``path`` (checking format, every shard's files and sizes); with ``recipe``, refuse
        one whose byte-level splitters or tokenizer differ from those the data was prepared with."""
        path = Path(path)
        record_path = path / PREPARATION
        if not record_path.is_file():
            what = f"holds no {PREPARATION} (not prepared, or prepare has not started)" if path.exists() else \
                "does not exist"
            raise PreparedDataError(f"prepared data {path} {what}; prepare it with: unetlm prepare RECIPE --out {path}")
        preparation = read_json(record_path, path)
        check_version(preparation, record_path, path)
        if recipe is not None:
            check_recipe(preparation, recipe, path)
        if preparation["num_units"] is None:
            raise PreparationIncomplete(
                f"{path}: prepare has not finished streaming the source; rerun the same unetlm prepare command"
            )
        tokenizer = _tokenizer(path, preparation)
        return cls(path, preparation, *_index(path, preparation), tokenizer)

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_maps": OrderedDict()}  # memory maps are reopened in the new process

    # ------------------------------------------------------------------ reading

    def read(self, start: int, stop: int) -> TokenStream:
        """Tokens ``[start, stop)`` of the stream: tokens int32, global document ids int32, masks (num_masks, n)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside the stream's {self.num_tokens} tokens")
        n = stop - start
        tokens = np.empty(n, dtype=np.int32)
        masks = np.empty((self.num_masks, n), dtype=bool)
        positions = np.arange(start, stop, dtype=np.int64)
        doc = np.searchsorted(self.doc_starts, positions, "right") - 1
        for k, a, b in self._shard_spans(start, stop):
            self._read_shard(k, a, b, doc[a - start : b - start], tokens[a - start : b - start],
                             masks[:, a - start : b - start])
        return TokenStream(tokens, doc.astype(np.int32), masks)

    def _shard_spans(self, start: int, stop: int):
        """(shard index, a, b): the non-empty parts ``[a, b)`` of tokens ``[start, stop)`` each shard holds."""
        if stop <= start:
            return
        first = int(np.searchsorted(self._shard_starts, start, "right")) - 1
        last = int(np.searchsorted(self._shard_starts, stop - 1, "right")) - 1
        for k in range(first, last + 1):
            shard = self.shards[k]
            a, b = max(start, shard.token_start), min(stop, shard.token_start + shard.num_tokens)
            if a < b:
                yield k, a, b

    def _read_shard(self, k: int, a: int, b: int, doc, tokens_out, masks_out) -> None:
        shard = self.shards[k]
        content, bits = self._maps_of(k)
        local = np.arange(a, b, dtype=np.int64) - shard.token_start
        is_bos = self.doc_starts[doc] == np.arange(a, b)
        index = local - (doc - shard.doc_start + 1)  # each document before, and this one, has one BOS
        kept = index[~is_bos]
        if len(kept):
            lo, hi = int(kept[0]), int(kept[-1]) + 1
            values = np.asarray(content[lo:hi])
            tokens_out[~is_bos] = values[kept - lo]
        tokens_out[is_bos] = BOS
        _unpack(bits, a - shard.token_start, b - shard.token_start, masks_out)

    def read_masks(self, start: int, stop: int) -> np.ndarray:
        """The masks (num_masks, stop - start) of tokens ``[start, stop)``, without reading the tokens."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside the stream's {self.num_tokens} tokens")
        masks = np.empty((self.num_masks, stop - start), dtype=bool)
        for k, a, b in self._shard_spans(start, stop):
            offset = self.shards[k].token_start
            _unpack(self._maps_of(k)[1], a - offset, b - offset, masks[:, a - start : b - start])
        return masks

    def _maps_of(self, k: int):
        if k in self._maps:
            self._maps.move_to_end(k)
            return self._maps[k]
        shard = self.shards[k]
        content = _memmap(shard.folder / token_file(shard.dtype), shard.dtype)
        bits = [_memmap(shard.folder / mask_file(s + 1), np.uint8) for s in range(self.num_masks)]
        self._maps[k] = (content, bits)
        if len(self._maps) > _OPEN_SHARDS:
            self._maps.popitem(last=False)
        return self._maps[k]

    def token_at_byte(self, n: int) -> int:
        """The number of tokens that end at or before stream byte ``n`` (a BOS counts as one byte),
        i.e. the first token that ends after it: where the held-out part starts when it starts at
        byte ``n`` (the held-out split of :mod:`unetlm.data.corpora`). A token that straddles
        ``n`` is held out. Bytes: ``n`` itself."""
        if n <= 0:
            return 0
        if n >= self.num_bytes:
            return self.num_tokens
        if self.tokenizer is BYTES:
            return n
        d = int(np.searchsorted(self.doc_byte_starts, n, "right")) - 1
        first = int(self.doc_starts[d])  # the document's BOS, stream byte doc_byte_starts[d]
        if self.doc_byte_starts[d] == n:
            return first
        end = int(self.doc_starts[d + 1]) if d + 1 < self.num_documents else self.num_tokens
        at, pos = first + 1, int(self.doc_byte_starts[d]) + 1  # a token, and the stream byte it starts at
        while at < end:  # the document's tokens a block at a time, however long it is
            ids = self.read(at, min(end, at + _TOKEN_BLOCK)).tokens
            ends = pos + np.cumsum(self.tokenizer.lengths[ids])
            k = int(np.searchsorted(ends, n, "right"))
            if k < len(ids):
                return at + k
            at, pos = at + len(ids), int(ends[-1])
        return end

    def verify(self) -> None:
        """Check every file's sha256 against its manifest; an error names the first corrupt file."""
        recorded = self.preparation.get("tokenizer_sha256")
        if recorded and file_digest(self.path / TOKENIZER) != recorded:
            raise PreparedDataError(
                f"{self.path / TOKENIZER} is corrupt (sha256 differs from {PREPARATION}); {reprepare_hint(self.path)}"
            )
        for shard in self.shards:
            for entry in shard.files:
                file = shard.folder / entry["file"]
                if file_digest(file) != entry["sha256"]:
                    raise PreparedDataError(
                        f"{file} is corrupt (sha256 differs from its manifest); delete {shard.folder} and rerun "
                        f"unetlm prepare to rewrite that shard"
                    )


def _unpack(bits, la: int, lb: int, out) -> None:
    """Unpack bits ``la .. lb - 1`` of each bit-packed mask in ``bits`` into the rows of ``out``."""
    for s, packed in enumerate(bits):
        unpacked = np.unpackbits(np.asarray(packed[la // 8 : (lb + 7) // 8]))
        out[s] = unpacked[la % 8 : la % 8 + (lb - la)].astype(bool)


def _memmap(path: Path, dtype):
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def check_recipe(preparation: dict, recipe, path: Path) -> None:
    """Refuse ``recipe`` if its byte-level splitters (options or code) or tokenizer are not those
    the ``preparation`` record names."""
    old, new = preparation["tokenizer"], recipe.model.tokenizer
    same = (old is None and new is None) or (
        old is not None and new is not None and (old["name"], old["vocab_size"]) == (new.name, new.vocab_size)
    )
    if not same:
        shown = None if new is None else {"name": new.name, "vocab_size": new.vocab_size}
        raise PreparedDataError(
            f"{path} was prepared with tokenizer {show(old) if old else 'bytes'}, but the recipe's tokenizer is "
            f"{show(shown) if shown else 'bytes'}; {stale_hint(path)}"
        )
    have, want = preparation["splitters"], splitter_identities(recipe)
    for s in range(max(len(have), len(want))):
        old = have[s] if s < len(have) else None
        new = want[s] if s < len(want) else None
        if old == new:
            continue
        change = None if old is None or new is None else code_change(old, new)
        if change:
            raise PreparedDataError(
                f"{path} was prepared with another version of stage {s + 1} splitter {show_splitter(new)} "
                f"({change}); its boundaries may differ: {stale_hint(path)}"
            )
        raise PreparedDataError(
            f"{path} was prepared with stage {s + 1} splitter {show_splitter(old)}, but the recipe's stage {s + 1} "
            f"splitter is {show_splitter(new)}; {stale_hint(path)}"
        )


def _tokenizer(path: Path, preparation: dict):
    if preparation["tokenizer"] is None:
        return BYTES
    from unetlm.data.bpe import BpeTokenizer

    file = path / TOKENIZER
    if not file.is_file():
        raise PreparedDataError(f"{file} is missing; {reprepare_hint(path)}")
    return BpeTokenizer.from_json(file.read_text(encoding="utf-8"))


def _parts(path: Path, preparation: dict):
    """(folder, manifest) of every shard of the stream in order: each unit's parts up to its last."""
    for unit in range(preparation["num_units"]):
        part = 0
        while True:
            folder = shard_dir(path, unit, part)
            manifest = open_shard(folder, preparation, path)
            yield folder, manifest
            if manifest["last"]:
                break
            part += 1


def _index(path: Path, preparation: dict):
    """Shards, document starts (tokens and stream bytes), tokens and bytes of the stream, up to the
    end of the document that crosses ``max_bytes``; checks every file of every shard used."""
    max_bytes = preparation["max_bytes"]
    shards, starts, byte_starts = [], [], []
    tokens = n_bytes = docs = 0
    for folder, manifest in _parts(path, preparation):
        index = np.fromfile(folder / DOCS, dtype=np.int64).reshape(-1, 2)
        used, cut = len(index), False
        if max_bytes:
            # a document ends at each BOS after the stream's first, and at the shard's end unless it
            # continues: (stream bytes there, BOS before it, BOS of this shard kept when cut there)
            ends = [(int(b), docs + k, k) for k, b in enumerate(index[:, 1]) if docs + k > 0]
            if not manifest["continues"] and docs + len(index) > 0:
                ends.append((manifest["num_bytes"], docs + len(index), len(index)))
            for end_byte, before, kept in ends:
                if n_bytes + end_byte - before >= max_bytes:  # content bytes of the documents ended so far
                    used, cut = kept, True
                    break
        shard_tokens = manifest["num_tokens"] if used == len(index) else int(index[used, 0])
        shard_bytes = manifest["num_bytes"] if used == len(index) else int(index[used, 1])
        shards.append(_Shard(folder, tokens, docs, shard_tokens, manifest["token_dtype"], manifest["files"]))
        starts.append(index[:used, 0] + tokens)
        byte_starts.append(index[:used, 1] + n_bytes)
        tokens, n_bytes, docs = tokens + shard_tokens, n_bytes + shard_bytes, docs + used
        if cut:
            break
    if docs == 0:
        raise PreparedDataError(f"{path} holds no documents (the data sources were empty); nothing to read")
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return shards, cat(starts), cat(byte_starts), tokens, n_bytes
