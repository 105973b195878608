"""Rows: no row handed to a model overflows a byte-level stage, in training and in eval; rows tile
the stream; documents on rows stay isolated; windows are an epoch permutation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from strategies import TINY_RECIPES, recipe_model, recipe_params, shortened
from unetlm.data.packing import TokenStream, pack
from unetlm.data.rows import FULL, cut_rows_in_memory, cut_rows, span_rows, row_reach
from unetlm.data.windows import BLOCK, StreamCorpus, TrainingData, read_rows, shares
from unetlm.core.tokens import BYTES
from unetlm.recipe import load_recipe
from unetlm.splitters.splitting import split_document

SEQ_LEN = 96
# runs of punctuation, digit groups, one-letter words and newlines: a boundary on nearly every byte
OVERFLOW_CHUNKS = [b"...", b"!?", b",", b";", b"12", b"3", b"4,5", b"a", b" a", b"I", b" ", b"\n", b"\n\n", b"--", b"x"]
overflow_text = st.lists(st.sampled_from(OVERFLOW_CHUNKS), min_size=1, max_size=120).map(b"".join)
overflow_docs = st.lists(overflow_text, min_size=1, max_size=4)
FILLER = b"a, b. 1 2 3!? I\n" * 30  # makes every split hold a whole sequence


def row_recipes() -> list:
    """Tiny recipes with a byte-level splitter (learned ones cannot cut rows from the data)."""
    out = []
    for path in TINY_RECIPES:
        stages = load_recipe(path).model.stages
        if len(stages) > 1 and not stages[1].splitter.build_class().learned:
            out.append(path)
    return recipe_params(out)


def tight(path) -> tuple[str, ...]:
    """Each coarse stage keeps its share of slots per byte as written, at SEQ_LEN bytes per row."""
    recipe = load_recipe(path)
    scale = SEQ_LEN / recipe.model.seq_len
    return tuple(
        f"model.stages[{i}].max_len={max(1, int(s.max_len * scale))}" for i, s in enumerate(recipe.model.stages[1:], 1)
    )


def tight_model(path):
    return recipe_model(path, seq_len=SEQ_LEN, std=0.2, dtype=torch.float64, extra=tight(path))


def limits_of(model) -> list[int]:
    return model.lengths[1 : 1 + len(model.splitters)]


def assert_rows_fit(batch, limits, seq_len):
    assert batch.tokens.shape[1] == seq_len
    for s, limit in enumerate(limits):
        assert int(batch.masks[s].sum(1).max()) <= limit, (s, batch.masks[s].sum(1).tolist(), limit)


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_greedy_rows_match_a_plain_loop(data):
    """The vectorised cut equals the obvious greedy loop, for any chunk size."""
    n = data.draw(st.integers(1, 300))
    seq_len = data.draw(st.integers(1, 40))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    masks, parent = [], np.ones(n, bool)
    for _ in range(data.draw(st.integers(0, 3))):
        parent = parent & (rng.random(n) < rng.random())
        masks.append(parent)
    masks = np.array(masks, dtype=bool).reshape(len(masks), n)
    limits = [data.draw(st.integers(1, 12)) for _ in masks]
    first = data.draw(st.integers(0, n - 1))
    stop = data.draw(st.integers(first, n))
    want, p = [], first
    while p < stop:
        e = p
        while e < min(stop, p + seq_len) and all(m[p : e + 1].sum() <= lim for m, lim in zip(masks, limits)):
            e += 1
        want.append((p, e))
        p = e
    chunk = data.draw(st.integers(1, 64))
    rows = cut_rows(lambda a, b: masks[:, a:b], first, stop, limits, seq_len, chunk=chunk)
    assert list(zip(rows.starts.tolist(), rows.ends.tolist())) == want
    early = rows.cause != FULL
    assert ((rows.ends - rows.starts)[~early][:-1] == seq_len).all()  # only the last full-cause row is short


@pytest.mark.parametrize("path", row_recipes())
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=overflow_docs)
def test_training_and_eval_rows_never_overflow(path, docs):
    model = tight_model(path)
    limits = limits_of(model)
    assert limits, "such a recipe has byte-level splitters"
    documents = docs + [FILLER]
    data = TrainingData.from_documents(documents, model.splitters, limits, SEQ_LEN, 4, 0.3, 0)
    source = data.sources[0]
    for rows in (source.train, source.valid):  # the rows tile their part of the stream
        assert (rows.starts[1:] == rows.ends[:-1]).all() and (rows.ends - rows.starts <= SEQ_LEN).all()
    batches = [data.train_batch(step) for step in range(3)] + data.valid_batches(2)
    for batch in batches:
        assert_rows_fit(batch, limits, SEQ_LEN)
    with torch.no_grad():
        out = model(batches[0].tokens, batches[0].doc, batches[0].masks, batches[0].targets)
    assert all(int(t.sum()) == 0 for t in out.truncated)
    # eval: every span's rows over the same stream fit as well
    stream = source.corpus.stream
    reach, _ = row_reach(stream.masks[: len(limits), : len(stream) - 1], limits, SEQ_LEN)
    spans = [(0, 0, len(stream) - 1)]
    rows = span_rows(reach, spans, SEQ_LEN)
    assert [a for _, _, a, _ in rows] == [0] + [b for *_, b in rows[:-1]] and rows[-1][3] == len(stream) - 1
    assert_rows_fit(read_rows([(stream, s, e) for s, e, _, _ in rows], SEQ_LEN), limits, SEQ_LEN)


ISOLATION = [p for p in row_recipes() if p.id.split("/")[-1] in ("au3.toml", "au4.toml", "spacebyte.toml")]


def without_bos(documents: list[bytes], splitters) -> TokenStream:
    """Documents told apart by their ids alone: no BOS, so a document's start is no boundary."""
    return TokenStream(
        np.concatenate([np.frombuffer(d, np.uint8).astype(np.int32) for d in documents]),
        np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(documents)]),
        np.concatenate([split_document(splitters, d) for d in documents], axis=1),
    )


@pytest.mark.parametrize("with_bos", [True, False], ids=["bos", "ids-only"])
@pytest.mark.parametrize("path", ISOLATION)
@settings(max_examples=3, deadline=None)
@given(first=overflow_text, second=overflow_text)
def test_a_document_on_a_row_never_moves_the_next(path, with_bos, first, second):
    """Replace the first document's bytes (same length) and the second's logits stay put."""
    model = tight_model(path)
    limits = limits_of(model)
    first = (first * 4)[:200]
    other = bytes(97 if c != 10 else c for c in first)  # fewer boundaries than ``first``
    build = pack if with_bos else without_bos
    stream = build([first, second], model.splitters)
    changed = build([other, second], model.splitters)
    bos = len(first) + with_bos  # the second document's first position (its BOS, if any)
    rows = cut_rows_in_memory(stream.masks, 0, len(stream) - 1, limits, SEQ_LEN)
    row = int(np.searchsorted(rows.ends, bos, side="right"))
    assume(row < len(rows))  # the second document starts inside a row
    start, end = int(rows.starts[row]), int(rows.ends[row])
    assume(start < bos < end)
    logits = []
    for s in (stream, changed):
        batch = read_rows([(s, start, end)], SEQ_LEN)
        assert_rows_fit(batch, limits, SEQ_LEN)
        with torch.no_grad():
            out = model(batch.tokens, batch.doc, batch.masks)  # explicit document ids from the stream
        assert all(int(t.sum()) == 0 for t in out.truncated)
        logits.append(out.logits[0, bos - start : end - start])
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)


def stream_corpus(docs) -> StreamCorpus:
    return StreamCorpus(pack(docs, []), BYTES.lengths)


def test_windows_are_a_permutation_per_epoch():
    docs = [bytes([97 + i % 26]) * (50 + 7 * i) for i in range(30)]
    data = TrainingData.build([(stream_corpus(docs), 1.0)], [], 16, 3, 0.1, seed=5)
    rows = len(data.sources[0].train)
    picked = [r for step in range(rows) for _, r in data.train_rows(step)]  # three epochs' worth
    epochs = [picked[e * rows : (e + 1) * rows] for e in range(3)]
    assert all(sorted(e) == list(range(rows)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert [data.epoch(step) for step in (0, rows // 3 + 1, rows - 1)] == [0, 1, 2]
    again = TrainingData.build([(stream_corpus(docs), 1.0)], [], 16, 3, 0.1, seed=5)
    assert [again.train_rows(s) for s in (0, 7, rows)] == [data.train_rows(s) for s in (0, 7, rows)]


def test_mixture_respects_weights():
    a = stream_corpus([b"a" * 4000])
    b = stream_corpus([b"b" * 4000])
    assert shares([3.0, 1.0]).tolist() == [BLOCK * 3 // 4, BLOCK // 4] and shares([1, 1, 1]).sum() == BLOCK
    data = TrainingData.build([(a, 3.0), (b, 1.0)], [], 16, 8, 0.1, seed=1)
    picks = [c for step in range(BLOCK // 8) for c, _ in data.train_rows(step)]
    assert picks.count(0) == BLOCK * 3 // 4
    first = [c for step in range(32) for c, _ in data.train_rows(step)]
    assert 0.6 < first.count(0) / len(first) < 0.9  # shuffled within the block, not in runs
    tokens = data.train_batch(3).tokens
    corpora = [c for c, _ in data.train_rows(3)]
    assert [int(t[0]) for t in tokens] == [97 if c == 0 else 98 for c in corpora]
    rows = [r for step in range(BLOCK // 8) for c, r in data.train_rows(step) if c == 1]
    n = len(data.sources[1].train)
    assert sorted(rows[:n]) == list(range(n))  # each corpus walks its own permutation


def test_training_on_overflow_prone_text_drops_no_boundary(tmp_path, monkeypatch):
    from test_train import tiny_recipe
    from unetlm.train import loop
    from unetlm.train.metrics import read_metrics

    (tmp_path / "c").mkdir()
    for i in range(4):
        (tmp_path / "c" / f"{i}.txt").write_bytes((b"1, 2; 3!? a b I\n...\n" * 20)[i:])
    recipe = tiny_recipe(str(tmp_path / "c" / "*.txt"), steps=2, eval_every=2, checkpoint_every=2)
    loop.train(recipe, tmp_path / "run", progress=False, sample=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["truncated"] for r in records] == [[0], [0]]
    assert all(r["epoch"] == 0 for r in records) and sum(r["padding"][0] for r in records) > 0

    real = loop.open_training_data

    def too_wide(corpora, valid_fraction, seq_len, lengths, *args):  # rows cut for stages twice as long
        return real(corpora, valid_fraction, seq_len, [lengths[0]] + [2 * n for n in lengths[1:]], *args)

    monkeypatch.setattr(loop, "open_training_data", too_wide)
    with pytest.raises(loop.TrainingError, match="dropped boundaries"):
        loop.train(recipe, tmp_path / "wide", progress=False, sample=False)


def test_auto_max_len_is_sized_from_the_data(tmp_path):
    from test_train import tiny_recipe_dict
    from unetlm.data.boundaries import recipe_splitters, sample_masks, stage_stats, with_auto_lengths
    from unetlm.recipe import RecipeError, recipe_from_dict
    from unetlm.api import build_model

    (tmp_path / "a.txt").write_bytes(b"1, 2; 3!? a b I\n...\n" * 200)
    table = tiny_recipe_dict(str(tmp_path / "a.txt"))
    table["model"]["stages"][1]["max_len"] = "auto"
    recipe = recipe_from_dict(table)
    with pytest.raises(RecipeError, match="max_len = 'auto' is sized from data"):
        build_model(recipe)
    sized = with_auto_lengths(recipe)
    n = sized.model.stages[1].max_len
    assert n % 16 == 0 and n <= 64  # at most the finer stage
    stats = stage_stats(recipe.model, sample_masks([(tmp_path / "a.txt").read_bytes()], recipe_splitters(recipe.model)))
    assert stats[0].auto == n and stats[0].max_len == "auto" and stats[0].overflow <= 0.001
    table["model"]["stages"][1]["max_len"] = 8  # tight: most windows overflow, rows pad
    tight_stats = stage_stats(recipe_from_dict(table).model, sample_masks([(tmp_path / "a.txt").read_bytes()],
                                                                          recipe_splitters(recipe.model)))
    assert tight_stats[0].overflow > 0.5 and tight_stats[0].padding > 0


@pytest.mark.parametrize("text", [b"", b"hello world"], ids=["empty", "short"])
def test_training_on_too_little_data_is_one_clean_line(tmp_path, capsys, text):
    from unetlm.cli import main

    (tmp_path / "a.txt").write_bytes(text)
    args = ["train", "--set", "data.source=files", "--set", f"data.paths=['{tmp_path / 'a.txt'}']",
            "--out", str(tmp_path / "run"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unetlm: error: the data holds")
    assert "about 5,130 bytes" in err[0] and "model.seq_len" in err[0]


def test_prepared_data_gives_the_batches_of_packing_in_ram(tmp_path):
    from unetlm.api import build_model
    from unetlm.data.corpora import open_corpora, open_training_data
    from unetlm.data.prepared import prepare
    from unetlm.data.sources import load_documents

    folder = tmp_path / "docs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        chunks = rng.choice(np.array(OVERFLOW_CHUNKS + [b"word ", b"text "], dtype=object), size=150)
        (folder / f"{i}.txt").write_bytes(b"".join(chunks))
    path = TINY_RECIPES[0].parent / "au3.toml"
    overrides = ["data.source=files", f"data.paths=['{folder}/*.txt']", *shortened(path, SEQ_LEN), *tight(path)]
    recipe = load_recipe(path, overrides)
    model = build_model(recipe)
    limits = limits_of(model)
    in_ram = TrainingData.from_documents(load_documents(recipe.data), model.splitters, limits, SEQ_LEN, 4, 0.2, 3)
    prepare(recipe, tmp_path / "prep", progress=False)
    prepared = load_recipe(path, [*overrides, f"data.prepared='{tmp_path / 'prep'}'"])
    corpora = open_corpora(prepared)
    data = open_training_data(corpora, 0.2, SEQ_LEN, model.lengths, len(model.splitters), 4, 3)
    assert sum(data.step_metrics(s)["padding"][0] + data.step_metrics(s)["padding"][1] for s in range(4)) > 0
    assert list((tmp_path / "prep" / "rows").glob("*.npz"))  # the rows are cached beside the data
    again = open_training_data(open_corpora(prepared), 0.2, SEQ_LEN, model.lengths, len(model.splitters), 4, 3)
    pairs = [(in_ram.train_batch(s), data.train_batch(s), again.train_batch(s)) for s in (0, 1, 5)]
    from unetlm.data.loader import step_batches

    ahead = list(step_batches(data, 4, 6, workers=2))  # loader processes read the memory-mapped shards
    pairs += [(in_ram.train_batch(s), b) for s, b in zip((4, 5), ahead)]
    pairs += list(zip(in_ram.valid_batches(2), data.valid_batches(2), again.valid_batches(2)))
    for batches in pairs:
        for other in batches[1:]:
            for name in ("tokens", "doc", "targets"):
                assert torch.equal(getattr(batches[0], name), getattr(other, name)), name
            assert all(torch.equal(a, b) for a, b in zip(batches[0].masks, other.masks))


def test_training_on_a_prepared_mixture(tmp_path):
    from test_train import tiny_recipe_dict
    from unetlm.data.prepared import prepare
    from unetlm.recipe import recipe_from_dict
    from unetlm.train import loop
    from unetlm.train.metrics import read_metrics

    dirs = []
    for name, text in (("a", b"the cat sat. " * 400), ("b", b"1, 2, 3! " * 400)):
        (tmp_path / f"{name}.txt").write_bytes(text)
        table = tiny_recipe_dict(str(tmp_path / f"{name}.txt"), steps=2, eval_every=2, checkpoint_every=2)
        prepare(recipe_from_dict(table), tmp_path / name, progress=False)
        dirs.append({"path": str(tmp_path / name), "weight": 3.0 if name == "a" else 1.0})
    table["data"]["prepared"] = dirs
    loop.train(recipe_from_dict(table), tmp_path / "run", progress=False, sample=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(r["truncated"] == [0] for r in records)


def test_show_reports_boundary_statistics(tmp_path, capsys):
    from unetlm.cli import main

    (tmp_path / "a.txt").write_bytes(b"1, 2; 3!? a b I\n...\n" * 100)
    assert main(["show", str(TINY_RECIPES[0].parent / "au3.toml"), "--data", str(tmp_path / "a.txt"),
                 "--set", 'model.stages[2].max_len="auto"']) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[lines.index(next(x for x in lines if x.startswith("stage  max_len"))) + 1:]]
    assert [r[0] for r in rows] == ["1", "2"] and rows[1][1] == "auto"
    assert float(rows[0][2].rstrip("%")) > 50  # 160 word slots per 512 bytes of punctuation overflow
    (tmp_path / "b.txt").write_bytes(b"ab")
    assert main(["show", str(TINY_RECIPES[0].parent / "au3.toml"), "--data", str(tmp_path / "b.txt")]) == 2
    assert "fewer than one window" in capsys.readouterr().err


def test_eval_scores_overflow_prone_text_without_truncation():
    from unetlm.eval.bpb import token_nll
    from unetlm.eval.choice import continuation_scores

    model = tight_model([p for p in TINY_RECIPES if p.name == "au3.toml"][0])
    text = b"1, 2; 3!? a b I\n...\n" * 8
    nll, _, _, truncated = token_nll(model, [text, b"x" + text], stride=SEQ_LEN // 2, batch_size=16)
    assert truncated == 0 and len(nll) == 2 * len(text) + 1 and (nll > 0).all()  # every byte scored once
    scores = continuation_scores(model, [(text[:150], b" a b."), (b"", text[:90])], batch_size=8)
    assert all(nll > 0 for nll, _ in scores)
