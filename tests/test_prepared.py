"""Prepared data: the shards read back as exactly the stream that packing the documents gives,
in any range, whatever the sharding, jobs or workers, and however the documents are cut into
pieces (a document longer than a piece, or than a shard); damaged, stale or partial data is an
error naming the file; bad input is one clean line from ``unetlm prepare``."""
from __future__ import annotations

import contextlib
import errno
import gzip
import importlib.util
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unetlm import cli
from unetlm.cli import main
from unetlm.data import jsonl as jsonl_module
from unetlm.data import sources
from unetlm.data.packing import pack
from unetlm.data.prepared import PreparedCorpus, PreparedDataError, cache_key, prepare
from unetlm.data.prepared import read as prepared_read
from unetlm.data.prepared import write as prepared_write
from unetlm.data.prepared.format import byte_splitter_components
from unetlm.data.sources import load_documents
from unetlm.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
# three regex stages: two presets and a pattern
BYTE_STAGES = ["model.stages.3.splitter={name = 'regex', pattern = '[.:;!?]'}"]

documents_st = st.lists(
    st.one_of(
        st.just(b""),
        st.binary(max_size=40),  # mostly invalid UTF-8
        st.text(alphabet="ab cd\n.,;!?12é", max_size=80).map(lambda t: t.encode("utf-8")),
        st.integers(300, 2000).map(lambda n: b"w" * n),  # one long word
    ),
    min_size=1,
    max_size=8,
).filter(any)  # a corpus with no text at all is an error (test_bad_input_is_one_clean_line)


def recipe_for(name: str, data: list[str], extra=()):
    return load_recipe(ROOT / "recipes" / "tiny" / f"{name}.toml", [*data, *extra])


def files_recipe(folder: Path, documents: list[bytes], name="au4", extra=()):
    """A recipe whose ``files`` source reads ``documents``, one file each, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(documents):
        (folder / f"{i:04d}.bin").write_bytes(data)
    data = ["data.source=files", f"data.paths=['{folder}/*.bin']"]
    return recipe_for(name, data, [*(BYTE_STAGES if name == "au4" else ()), *extra])


def jsonl_recipe(path: Path, documents: list[bytes], name="au4", extra=()):
    """A recipe whose ``jsonl`` source holds ``documents`` (invalid UTF-8 as escaped surrogates)."""
    lines = [json.dumps({"text": d.decode("utf-8", errors="surrogateescape")}) for d in documents]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = ["data.source=jsonl", f"data.paths=['{path}']"]
    return recipe_for(name, data, [*(BYTE_STAGES if name == "au4" else ()), *extra])


def reference(recipe, tokenizer):
    """The stream packing the recipe's documents gives (what training did before prepared data)."""
    splitters = [c.build_class()(c.config) for c in byte_splitter_components(recipe)]
    return pack(load_documents(recipe.data), splitters, tokenizer)


def assert_same(got, want) -> None:
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.doc, want.doc)
    np.testing.assert_array_equal(got.masks, want.masks)
    assert got.tokens.dtype == np.int32 and got.doc.dtype == np.int32 and got.masks.dtype == bool


def check_reads(corpus: PreparedCorpus, want, ranges) -> None:
    assert corpus.num_tokens == len(want)
    assert corpus.num_masks == want.masks.shape[0]
    assert_same(corpus.read(0, corpus.num_tokens), want)
    for a, b in ranges:
        a, b = sorted((a % (len(want) + 1), b % (len(want) + 1)))
        assert_same(corpus.read(a, b), want.slice(a, b))
    np.testing.assert_array_equal(corpus.doc_starts, np.flatnonzero(want.tokens == 256))


ranges_st = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=6)


@contextlib.contextmanager
def small_pieces(read_bytes: int):
    """Documents read in pieces of ``read_bytes`` (jsonl lines longer than that parsed as they are read)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "READ_BYTES", read_bytes)
        patch.setattr(jsonl_module, "LINE_BYTES", read_bytes)
        yield


@settings(max_examples=15)
@given(documents=documents_st, ranges=ranges_st, shard_bytes=st.sampled_from([1, 200, 1 << 20]), jsonl=st.booleans(),
       read_bytes=st.sampled_from([3, 64, 1 << 20]))
def test_byte_recipe_reads_as_packing(documents, ranges, shard_bytes, jsonl, read_bytes):
    with tempfile.TemporaryDirectory() as tmp, small_pieces(read_bytes):
        tmp = Path(tmp)
        recipe = jsonl_recipe(tmp / "d.jsonl", documents) if jsonl else files_recipe(tmp / "docs", documents)
        # files: a shard per file at 1 byte; jsonl: shards are byte ranges, lines cross their ends
        prepare(recipe, tmp / "out", shard_bytes=max(shard_bytes, 200) if jsonl else shard_bytes, progress=False)
        corpus = PreparedCorpus.open(tmp / "out", recipe)
        want = reference(recipe, corpus.tokenizer)
        assert corpus.num_masks == 3 and corpus.num_documents == len(documents)
        assert corpus.num_bytes == sum(len(d) + 1 for d in documents)
        check_reads(corpus, want, ranges)
        for n in (0, 1, corpus.num_bytes // 3, corpus.num_bytes, corpus.num_bytes + 5):
            assert corpus.token_at_byte(n) == min(n, corpus.num_tokens)
        corpus.verify()


@settings(max_examples=6)
@given(documents=documents_st, ranges=ranges_st, cut=st.integers(0, 4000))  # a stream byte where the held-out part could start
def test_bpe_recipe_reads_as_packing(documents, ranges, cut):
    with tempfile.TemporaryDirectory() as tmp, small_pieces(16), pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepared_read, "_TOKEN_BLOCK", 5)  # long documents are encoded and walked piece by piece
        tmp = Path(tmp)
        recipe = jsonl_recipe(tmp / "d.jsonl", documents, "bpe", ["model.tokenizer.vocab_size=300"])
        prepare(recipe, tmp / "out", shard_bytes=200, progress=False)
        corpus = PreparedCorpus.open(tmp / "out", recipe)
        assert corpus.tokenizer.vocab_size == 300 and corpus.num_masks == 0
        want = reference(recipe, corpus.tokenizer)
        check_reads(corpus, want, ranges)
        ends = np.cumsum(corpus.tokenizer.lengths[want.tokens])  # stream byte after each token
        assert corpus.num_bytes == int(ends[-1])
        for n in (cut, cut + 1, int(ends[len(ends) // 2])):
            assert corpus.token_at_byte(n) == int(np.searchsorted(ends, n, "right"))  # ByteData's held-out cut


def test_max_bytes_cuts_after_the_crossing_document(tmp_path):
    documents = [b"one two", b"three four five", b"six", b"seven eight"]
    recipe = files_recipe(tmp_path / "docs", documents, extra=["data.max_bytes=12"])
    prepare(recipe, tmp_path / "out", shard_bytes=1, progress=False)
    corpus = PreparedCorpus.open(tmp_path / "out")
    assert corpus.num_documents == 2 == len(load_documents(recipe.data))
    check_reads(corpus, reference(recipe, corpus.tokenizer), [(3, 20)])


def test_learned_splitters_have_no_mask(tmp_path):
    recipe = recipe_for("hnet", ["data.max_bytes=3000"])
    corpus = PreparedCorpus.open(prepare(recipe, tmp_path / "out", progress=False), recipe)
    assert corpus.num_masks == 0 and corpus.preparation["splitters"] == []
    check_reads(corpus, reference(recipe, corpus.tokenizer), [(10, 900)])
    with pytest.raises(PreparedDataError, match="stage 1 splitter \\(none\\), but the recipe's stage 1 splitter is {name = 'regex'"):
        PreparedCorpus.open(tmp_path / "out", recipe_for("au2", []))


def read_all(path: Path) -> tuple:
    corpus = PreparedCorpus.open(path)
    stream = corpus.read(0, corpus.num_tokens)
    return stream.tokens.tolist(), stream.doc.tolist(), stream.masks.tolist()


def pydocs_recipe(extra=()):
    return recipe_for("au4", ["data.max_bytes=60000"], [*BYTE_STAGES, *extra])


def test_jobs_and_workers_give_one_run(tmp_path, monkeypatch, capsys):
    """--shard I/N over N jobs (the last one as torchrun's rank 1 of 3), and 2 worker processes,
    write the stream one run writes."""
    documents = [b"doc %d: some words. " % i * (i + 1) for i in range(12)]
    documents[3] = "a document longer than a shard, cut in pieces inside its characters. é中😀 ".encode() * 9
    recipe = files_recipe(tmp_path / "docs", documents, extra=["data.max_bytes=1500"])  # jobs cannot know where it cuts
    monkeypatch.setattr(sources, "READ_BYTES", 37)
    prepare(recipe, tmp_path / "one", shard_bytes=100, progress=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(cli, "end_process", lambda status: None)  # a torchrun worker would end here; pytest goes on
    overrides = [f"--set={o}" for o in ["data.source=files", f"data.paths=['{tmp_path}/docs/*.bin']",
                                         "data.max_bytes=1500", *BYTE_STAGES]]
    assert main(["prepare", str(ROOT / "recipes/tiny/au4.toml"), *overrides, "--out", str(tmp_path / "jobs"),
                 "--shard-bytes", "100", "--quiet"]) == 0
    assert "prepared job 1/3 of" in capsys.readouterr().out
    prepare(recipe, tmp_path / "jobs", shard=(2, 3), shard_bytes=100, progress=False)
    with pytest.raises(PreparedDataError, match="00000-0000 is missing"):
        PreparedCorpus.open(tmp_path / "jobs")
    prepare(recipe, tmp_path / "jobs", shard=(0, 3), shard_bytes=100, progress=False)
    prepare(recipe, tmp_path / "pool", workers=2, shard_bytes=100, progress=False)
    assert read_all(tmp_path / "jobs") == read_all(tmp_path / "one") == read_all(tmp_path / "pool")
    corpus = PreparedCorpus.open(tmp_path / "jobs")
    assert corpus.preparation["num_units"] > 3
    assert corpus.num_documents == len(load_documents(recipe.data)) < len(documents)
    units = [folder.name[:5] for folder in (tmp_path / "jobs" / "shards").iterdir()]
    assert max(units.count(u) for u in units) > 3  # the long document spans shards
    check_reads(corpus, reference(recipe, corpus.tokenizer), [(0, 10**6)])


def test_a_shard_killed_mid_write_is_not_visible_and_a_rerun_completes_it(tmp_path, monkeypatch):
    recipe = files_recipe(tmp_path / "docs", [b"alpha beta. " * 60 for _ in range(3)])  # a unit each, 3 shards each
    monkeypatch.setattr(sources, "READ_BYTES", 100)
    prepare(recipe, tmp_path / "one", shard_bytes=300, progress=False)
    writes = []

    def dies(f, data):
        if ".00001-0001.tmp" in f.name:
            writes.append(len(data))
            if len(writes) == 3:
                raise KeyboardInterrupt  # killed in the middle of unit 1's second shard
        f.write(data)

    monkeypatch.setattr(prepared_write, "write_bytes", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare(recipe, tmp_path / "out", shard_bytes=300, progress=False)
    shards = tmp_path / "out" / "shards"
    finished = sorted(p.name for p in shards.iterdir())
    assert finished == ["00000-0000", "00000-0001", "00000-0002"]  # nothing half-written, no unit half-finished
    (shards / ".00001-0000.tmp-1").mkdir()  # what a SIGKILL would leave behind
    (shards / "00001-0000").mkdir()  # and a finished first shard of an unfinished unit
    with pytest.raises(PreparedDataError, match="shard .*00001-0000 is missing"):
        PreparedCorpus.open(tmp_path / "out")
    monkeypatch.setattr(prepared_write, "write_bytes", lambda f, data: f.write(data))
    mtime = (shards / finished[0] / "manifest.json").stat().st_mtime_ns
    prepare(recipe, tmp_path / "out", shard_bytes=300, progress=False)
    assert (shards / finished[0] / "manifest.json").stat().st_mtime_ns == mtime  # finished units are skipped
    assert not list(shards.glob(".*"))
    assert read_all(tmp_path / "out") == read_all(tmp_path / "one")


def test_stale_splitters_tokenizer_and_damaged_shards_are_refused(tmp_path, capsys):
    recipe = pydocs_recipe()
    out = prepare(recipe, tmp_path / "out", progress=False)
    PreparedCorpus.open(out, recipe)
    stale = pydocs_recipe(["model.stages.2.splitter.preset=word4"])
    with pytest.raises(PreparedDataError) as info:
        PreparedCorpus.open(out, stale)
    message = str(info.value)
    both = r"stage 2 splitter \{name = 'regex'[^}]*preset = 'lingua-word2'[^}]*\}, but the recipe's stage 2 splitter is " \
        r"\{name = 'regex'[^}]*preset = 'word4'[^}]*\}"
    assert re.search(both, message), message
    assert message.endswith(f"re-prepare with: unetlm prepare RECIPE --out {out}")
    assert cache_key(stale) != cache_key(recipe) == cache_key(pydocs_recipe())
    with pytest.raises(PreparedDataError, match="stage 2 splitter .* but the recipe's stage 2 splitter is \\(none\\)"):
        PreparedCorpus.open(out, recipe_for("au2", []))
    with pytest.raises(PreparedDataError, match="tokenizer bytes, but the recipe's tokenizer is {name = 'bpe'"):
        PreparedCorpus.open(out, recipe_for("bpe", []))

    shard = out / "shards" / "00000-0000"
    corpus = PreparedCorpus.open(out)
    mask = shard / "mask2.bits"
    data = bytearray(mask.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mask.write_bytes(bytes(data))
    with pytest.raises(PreparedDataError, match=f"{mask} is corrupt"):
        corpus.verify()
    overrides = ["--set=data.max_bytes=60000", *(f"--set={o}" for o in BYTE_STAGES)]
    code, err = run_cli(capsys, "prepare", str(ROOT / "recipes/tiny/au4.toml"), *overrides, "--out", str(out), "--verify", "--quiet")
    assert code == 1 and err.startswith(f"unetlm: error: {mask} is corrupt")
    mask.write_bytes(bytes(data[:-1]))
    with pytest.raises(PreparedDataError, match=f"{mask} is truncated or damaged: {len(data) - 1} bytes, its manifest says {len(data)}"):
        PreparedCorpus.open(out)
    (shard / "tokens.u8").unlink()
    with pytest.raises(PreparedDataError, match=f"{shard / 'tokens.u8'} is missing; rerun the same unetlm prepare"):
        PreparedCorpus.open(out)
    prepare(recipe, out, progress=False)  # rewrites the damaged shard
    PreparedCorpus.open(out, recipe).verify()


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_bad_input_is_one_clean_line(tmp_path, capsys, monkeypatch):
    recipe = str(ROOT / "recipes" / "tiny" / "au2.toml")
    out = str(tmp_path / "out")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n\n{"text": broken\n{"text": "also fine"}\n{"body": 1}\n')
    source = ["--set", "data.source=jsonl", "--set", f"data.paths=['{jsonl}']"]

    code, err = run_cli(capsys, "prepare", recipe, *source, "--out", out, "--quiet")
    assert code == 2 and err.startswith(f"unetlm: error: {jsonl}:3: not a JSON object") and "--skip-bad" in err
    assert "\n" not in err
    assert main(["prepare", recipe, *source, "--out", out, "--quiet", "--skip-bad"]) == 0
    assert f"skipped 2 bad input lines (the first: {jsonl}:3: not a JSON object" in capsys.readouterr().out
    assert PreparedCorpus.open(out).num_documents == 2

    code, err = run_cli(capsys, "prepare", recipe, "--set", f"data.paths=['{tmp_path}/*.none']",
                        "--set", "data.source=files", "--out", str(tmp_path / "o2"))
    assert code == 2 and err == f"unetlm: error: data.paths: '{tmp_path}/*.none' matches no file"

    (tmp_path / "empty.jsonl").write_bytes(b"\n")
    code, err = run_cli(capsys, "prepare", recipe, "--set", "data.source=jsonl", "--set",
                        f"data.paths=['{tmp_path}/empty.jsonl']", "--out", str(tmp_path / "o3"), "--quiet")
    assert code == 1 and err.startswith("unetlm: error: ") and "holds no documents" in err

    code, err = run_cli(capsys, "prepare", recipe, "--out", out, "--shard", "3/2")
    assert code == 2 and err == "unetlm: error: --shard 3/2: expected I/N with 0 <= I < N"

    def full(f, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepared_write, "write_bytes", full)
    code, err = run_cli(capsys, "prepare", recipe, "--set", "data.max_bytes=1000", "--out", str(tmp_path / "o4"), "--quiet")
    assert code == 1 and err.startswith("unetlm: error: no space left on the device while writing") and "\n" not in err
    assert list((tmp_path / "o4" / "shards").iterdir()) == []
    monkeypatch.undo()

    record = Path(out) / "preparation.json"
    data = json.loads(record.read_text())
    record.write_text(json.dumps(data | {"version": 99}))
    code, err = run_cli(capsys, "prepare", recipe, *source, "--out", out, "--quiet")
    assert code == 1 and "format version 99; this unetlm reads version 2" in err
    with pytest.raises(PreparedDataError, match="format version 99"):
        PreparedCorpus.open(out)


def test_a_changing_file_a_corrupt_one_and_an_unknown_splitter_are_one_clean_line(tmp_path, capsys, monkeypatch):
    """A source file that changes while it is read stops prepare with its name and leaves no
    shard of its unit; so does corrupt compressed data (with the offset), and a splitter whose
    identity cannot be computed is named."""
    recipe = str(ROOT / "recipes" / "tiny" / "au2.toml")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_bytes(b"a first document. " * 40)
    (docs / "b.txt").write_bytes(b"a second document, longer than a shard. " * 200)
    source = ["--set", "data.source=files", "--set", f"data.paths=['{docs}/*.txt']", "--shard-bytes", "500"]
    monkeypatch.setattr(sources, "READ_BYTES", 500)
    writes = []

    def grows(f, data):  # the second file grows while its second shard is written
        if ".00001-0001.tmp" in f.name and not writes:
            writes.append(1)
            with open(docs / "b.txt", "ab") as g:
                g.write(b"appended")
        f.write(data)

    monkeypatch.setattr(prepared_write, "write_bytes", grows)
    code, err = run_cli(capsys, "prepare", recipe, *source, "--out", str(tmp_path / "o1"), "--quiet")
    assert code == 2 and err.startswith(f"unetlm: error: {docs / 'b.txt'} changed while it was being prepared") and (
        "\n" not in err)
    assert {p.name[:5] for p in (tmp_path / "o1" / "shards").iterdir()} == {"00000"}  # of unit 1: nothing
    monkeypatch.setattr(prepared_write, "write_bytes", lambda f, data: f.write(data))

    (docs / "c.txt.gz").write_bytes(gzip.compress(b"text " * 100)[:-20])
    code, err = run_cli(capsys, "prepare", recipe, "--set", "data.source=files", "--set", f"data.paths=['{docs}/*']",
                        "--out", str(tmp_path / "o2"), "--quiet")
    assert code == 2 and err.startswith(f"unetlm: error: {docs / 'c.txt.gz'}: corrupt gzip data near compressed byte")

    from types import ModuleType

    from unetlm.plugins import register_plugin, registry

    module = ModuleType("unsourced_plugin")  # a splitter compiled from text that is nowhere to be read
    exec(compile("from unetlm.splitters.space import SpaceSplitter\n\nclass Unsourced(SpaceSplitter):\n"
                 "    def start(self):\n        return super().start()\n", "<generated>", "exec"), module.__dict__)
    exec("from unetlm.plugins import hookimpl\n@hookimpl\ndef unetlm_register(registry):\n"
         "    registry.add('splitter', 'unsourced', 'unsourced_plugin:Unsourced', 'a test splitter')\n", module.__dict__)
    monkeypatch.setitem(__import__("sys").modules, "unsourced_plugin", module)
    register_plugin(module, "plugin unsourced")
    try:
        code, err = run_cli(capsys, "prepare", recipe, "--set", "model.stages.1.splitter={name = 'unsourced'}",
                            "--set", "data.max_bytes=1000", "--out", str(tmp_path / "o3"), "--quiet")
    finally:
        registry().drop_origin("plugin unsourced")
    assert code == 2 and err.startswith("unetlm: error: model.stages[1].splitter 'unsourced': splitter class "
                                        "unsourced_plugin.Unsourced: its identity cannot be computed") and "\n" not in err


def test_entropy_masks_come_from_batched_windows(tmp_path):
    """An entropy splitter's masks are computed over many documents' windows per forward, and
    equal splitting each document on its own."""
    try:  # the example entropy model: the tests' fixture module, or the splitter module that defines it
        from entropy_example import with_example_checkpoint
    except ImportError:
        from unetlm.splitters.entropy import with_example_checkpoint

    documents = [b"", b"short one", b"\xff\xfe bytes " * 9, b"a much longer document. " * 12]
    recipe = with_example_checkpoint(files_recipe(tmp_path / "docs", documents, "blt"))
    splitter = byte_splitter_components(recipe)[0]
    splitter = splitter.build_class()(splitter.config)
    for data, values in zip(documents, splitter.batch_entropies(documents, rows=3)):
        np.testing.assert_allclose(values, splitter.entropies(data), atol=1e-5)
    prepare(recipe, tmp_path / "out", progress=False)
    corpus = PreparedCorpus.open(tmp_path / "out", recipe)
    want = reference(recipe, corpus.tokenizer)
    assert corpus.num_masks == 1 and 0 < want.masks.sum() < len(want)
    check_reads(corpus, want, [(5, 200)])
    moved = tmp_path / "moved.pt"  # the model is known by its content: a copy elsewhere is the same splitter
    moved.write_bytes(Path(splitter.config.checkpoint).read_bytes())
    recipe.model.stages[1].splitter.config.checkpoint = str(moved)
    PreparedCorpus.open(tmp_path / "out", recipe)
    recipe.model.stages[1].splitter.config.threshold = 3.0
    with pytest.raises(PreparedDataError, match="stage 1 splitter {name = 'entropy', checkpoint = {sha256 = '"):
        PreparedCorpus.open(tmp_path / "out", recipe)


def test_parquet_row_groups_and_streamed_rows_shard_like_one_run(tmp_path, monkeypatch):
    """Parquet shards are runs of row groups; a streamed dataset is cut into shards of rows while
    streaming (every job streams it). 2 jobs, and one run with 2 workers, write the same stream."""
    import sys
    import types

    from unetlm.data.prepared import assignment

    rows = [f"row {i}: words, more words." * (i % 4) for i in range(20)]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda name, subset, split, streaming: iter({"text": r} for r in rows)))
    monkeypatch.setattr(assignment, "HF_ROWS", 3)
    streamed = ["data.source=hf", "data.dataset=some/rows", "data.max_bytes=300"]
    recipes = {"hf": recipe_for("au2", streamed)}
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": rows}), tmp_path / "d.parquet", row_group_size=4)
        recipes["parquet"] = recipe_for("au2", ["data.source=parquet", f"data.paths=['{tmp_path}/d.parquet']"])
    for name, recipe in recipes.items():
        prepare(recipe, tmp_path / f"{name}-one", shard_bytes=1, workers=2, progress=False)
        for job in (1, 0):
            prepare(recipe, tmp_path / f"{name}-jobs", shard=(job, 2), shard_bytes=1, progress=False)
        one = PreparedCorpus.open(tmp_path / f"{name}-one", recipe)
        assert one.preparation["num_units"] > 2
        assert read_all(tmp_path / f"{name}-jobs") == read_all(tmp_path / f"{name}-one")
        check_reads(one, reference(recipe, one.tokenizer), [(7, 100)])
