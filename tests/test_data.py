"""Data: sources give raw bytes (plain or compressed files and jsonl, read as streams of pieces),
batches are a pure function of (seed, step, rank, world)."""
from __future__ import annotations

import gzip
import json
import lzma

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unetlm.data.loader import step_batches
from unetlm.data.packing import pack
from unetlm.data.windows import TrainingData
from unetlm.data import sources
from unetlm.data.errors import SourceError
from unetlm.data.sources import iter_pieces, load_documents
from unetlm.core.tokens import BOS
from unetlm.recipe import RecipeError
from unetlm.recipe.schema import DataSpec
from unetlm.splitters.regex import RegexSplitter


def data_spec(**kw) -> DataSpec:
    from unetlm.recipe.structure import structure

    return structure(DataSpec, kw, "data")


def test_files_and_globs_read_raw_bytes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(b"first")
    (tmp_path / "sub" / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    docs = load_documents(data_spec(source="files", paths=[str(tmp_path / "**" / "*.txt")]))
    assert docs == [b"first", b"\xff\xfe not utf-8"]
    with pytest.raises(RecipeError, match="matches no file"):
        load_documents(data_spec(source="files", paths=[str(tmp_path / "*.none")]))


def test_jsonl_text_field_keeps_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"body": "héllo", "id": 1}).encode(), b"", b'{"body": "raw \xff byte"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs = load_documents(data_spec(source="jsonl", paths=[str(path)], text_field="body"))
    assert docs == ["héllo".encode(), b"raw \xff byte"]
    with pytest.raises(RecipeError, match="no field 'text'"):
        load_documents(data_spec(source="jsonl", paths=[str(path)]))


def compress(kind: str, data: bytes) -> bytes:
    if kind == ".gz":
        return gzip.compress(data)
    if kind == ".xz":
        return lzma.compress(data)
    import zstandard

    half = len(data) // 2  # two frames, as a multi-threaded or appended .zst holds
    frame = zstandard.ZstdCompressor(write_checksum=True).compress
    return frame(data[:half]) + frame(data[half:])


@pytest.mark.parametrize("kind", [".gz", ".xz", ".zst"])
def test_compressed_files_and_jsonl_are_read_as_streams(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(sources, "READ_BYTES", 64)  # every document in many pieces
    docs = [b"plain text. " * 40, "é中😀 ".encode() * 30, b"", b"\xff\xfe bytes"]
    for i, data in enumerate(docs):
        (tmp_path / f"{i}.txt{kind}").write_bytes(compress(kind, data))
    lines = b"".join(json.dumps({"text": d.decode("utf-8", "surrogateescape")}).encode() + b"\n" for d in docs)
    (tmp_path / f"d.jsonl{kind}").write_bytes(compress(kind, lines))
    files = data_spec(source="files", paths=[str(tmp_path / f"*.txt{kind}")])
    assert load_documents(files) == docs
    assert all(len(piece) <= 64 for piece, _ in iter_pieces(files))
    assert load_documents(data_spec(source="jsonl", paths=[str(tmp_path / f"d.jsonl{kind}")])) == docs

    whole = compress(kind, docs[0])
    for broken, what in ((whole[: len(whole) * 2 // 3], "cut short"), (b"not compressed" * 9, "not compressed")):
        (tmp_path / f"bad.txt{kind}").write_bytes(broken)
        with pytest.raises(SourceError, match=rf"^{tmp_path / f'bad.txt{kind}'}: corrupt \w+ data near compressed byte "
                                              r"[\d,]+ \(after [\d,]+ bytes of content\)") as info:
            load_documents(data_spec(source="files", paths=[str(tmp_path / f"bad.txt{kind}")]))
        assert "\n" not in str(info.value), what


@pytest.mark.parametrize("kind", [".gz", ".xz", ".zst"])
def test_damage_after_the_first_frame_and_an_empty_file_are_errors(tmp_path, kind):
    """Readers that stop quietly at a damaged later stream (``LZMAFile``) or take an empty file for an
    empty document would drop data without a word."""
    first, second = compress(kind, b"first part\n" * 500), bytearray(compress(kind, b"second part\n" * 500))
    second[0] ^= 0xFF  # the second frame's magic number
    cases = {"damaged-later.txt": first + bytes(second), "trailing.txt": first + b"garbage!"}
    for name, content in cases.items():
        (tmp_path / f"{name}{kind}").write_bytes(content)
        with pytest.raises(SourceError, match=rf"^{tmp_path / name}{kind}: corrupt \w+ data near compressed byte "):
            load_documents(data_spec(source="files", paths=[str(tmp_path / f"{name}{kind}")]))
    (tmp_path / f"empty.txt{kind}").write_bytes(b"")
    with pytest.raises(SourceError, match=rf"^{tmp_path / 'empty.txt'}{kind}: empty file, not \w+ data$"):
        load_documents(data_spec(source="files", paths=[str(tmp_path / f"empty.txt{kind}")]))


@pytest.mark.parametrize("kind", [".xz", ".zst"])
def test_highly_compressed_data_is_decompressed_a_bounded_step_at_a_time(tmp_path, kind):
    """256 MiB of zeros in about 10 KB (256 frames): reading it never holds more than a few MiB of it."""
    import tracemalloc

    frame = compress(kind, bytes(1 << 20)) if kind == ".xz" else __import__("zstandard").ZstdCompressor().compress(
        bytes(1 << 20))
    (tmp_path / f"zeros{kind}").write_bytes(frame * 256)
    tracemalloc.start()
    try:
        read = sum(len(piece) for piece, _ in sources.file_pieces(tmp_path / f"zeros{kind}"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert read == 256 << 20 and peak < 48 << 20


def test_a_glob_over_many_files_reads_one_at_a_time(tmp_path, monkeypatch):
    for i in range(3000):
        (tmp_path / f"{i:05d}.txt").write_bytes(b"document %d" % i)
    opened = []
    real = sources.InputFile.__init__

    def counting(self, path, *args, **kwargs):
        opened.append(path)
        real(self, path, *args, **kwargs)

    monkeypatch.setattr(sources.InputFile, "__init__", counting)
    pieces = iter_pieces(data_spec(source="files", paths=[str(tmp_path / "*.txt")]))
    assert next(pieces) == (b"document 0", True) and len(opened) == 1
    assert sum(1 for _ in pieces) == 2999 and len(opened) == 3000


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two", None]}), tmp_path / "d.parquet")
    assert load_documents(data_spec(source="parquet", paths=[str(tmp_path / "*.parquet")])) == [b"one", b"two"]


def test_hf_source_needs_a_name_and_a_limit():
    with pytest.raises(RecipeError, match="data.dataset"):
        data_spec(source="hf", max_bytes=100)
    with pytest.raises(RecipeError, match="data.max_bytes"):
        data_spec(source="hf", dataset="x/y")
    with pytest.raises(RecipeError, match="needs at least one path"):
        data_spec(source="jsonl")


def test_max_bytes_stops_after_the_crossing_document():
    docs = load_documents(data_spec(source="pydocs", max_bytes=1000))
    assert sum(map(len, docs[:-1])) < 1000 <= sum(map(len, docs))


def make_data(batch_size=4, seed=0) -> TrainingData:
    rng = np.random.default_rng(1)
    docs = [bytes(rng.choice(list(b"ab cd. "), size=int(n))) for n in rng.integers(5, 200, size=40)]
    splitters = [RegexSplitter(RegexSplitter.Config(preset="word"))]
    return TrainingData.from_documents(docs, splitters, [32], 32, batch_size, 0.2, seed)


def test_pack_marks_documents():
    stream = pack([b"ab", b"c"], [])
    assert stream.tokens.tolist() == [BOS, 97, 98, BOS, 99]
    assert stream.doc.tolist() == [0, 0, 0, 1, 1]


@settings(max_examples=10)
@given(step=st.integers(0, 10**6), world=st.sampled_from([1, 2, 4]))
def test_rank_shards_concatenate_to_the_global_batch(step, world):
    data = make_data(batch_size=4)
    whole = data.train_batch(step)
    parts = [data.train_batch(step, r, world) for r in range(world)]
    assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
    assert torch.equal(torch.cat([p.masks[0] for p in parts]), whole.masks[0])
    assert torch.equal(make_data(batch_size=4).train_batch(step).tokens, whole.tokens)  # deterministic
    assert not torch.equal(make_data(batch_size=4, seed=1).train_batch(step).tokens, whole.tokens)


def test_batch_must_split_over_ranks():
    with pytest.raises(ValueError, match="does not split"):
        make_data(batch_size=4).train_batch(0, 0, 3)


def test_loader_workers_keep_step_order():
    data = make_data()
    plain = [b.tokens for b in step_batches(data, 3, 11)]
    workers = [b.tokens for b in step_batches(data, 3, 11, workers=2)]
    assert len(plain) == len(workers) == 8
    assert all(torch.equal(a, b) for a, b in zip(plain, workers))
    assert torch.equal(plain[0], data.train_batch(3).tokens)


def test_validation_rows_shard_like_training():
    data = make_data()
    whole = data.valid_batches(2)
    halves = [data.valid_batches(2, r, 2) for r in range(2)]
    for i in range(2):
        assert torch.equal(torch.cat([h[i].tokens for h in halves]), whole[i].tokens)
