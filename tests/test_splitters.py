"""The splitter contract, for every registered byte-level splitter and each of its example configs.

Stability: ``boundaries(x + y)[:len(x)] == boundaries(x)`` (a decision never changes once
later bytes arrive), alone and chained (one splitter's output as the next one's parent).
A deliberately unstable pre-tokenizer splitter shows that the property check finds real flaws.
Chunks: a document fed to a splitter's scan in chunks of any sizes gets exactly its whole
``boundaries``, also when a chunk ends inside a UTF-8 character or a word longer than a chunk.
"""
from __future__ import annotations

import numpy as np
import pytest
import regex
from hypothesis import example, find, given, settings
from hypothesis import strategies as st

from strategies import byte_splitter_cases, case_id, documents, long_words, make_splitter, rich_bytes, with_parent
from unetlm.splitters.splitting import ChainScan, split_document, split_row
from unetlm.core.tokens import BOS, PAD

# learned splitters decide inside the model from hidden states (test_causality.py, test_hnet.py)
SPLITTERS = [pytest.param(name, options, id=case_id(name, options)) for name, options in byte_splitter_cases()]


def _chain_pairs() -> list:
    """Every example config chained after itself, after the word preset, and before a config
    half the list away (another splitter, usually): each one is a parent and a child."""
    cases = byte_splitter_cases()
    word = ("regex", {"preset": "word"})
    pairs = []
    for i, case in enumerate(cases):
        for pair in ((case, case), (word, case), (case, cases[(i + (len(cases) + 1) // 2) % len(cases)])):
            if pair not in pairs:
                pairs.append(pair)
    return [pytest.param(a, b, id=f"{case_id(*a)}>{case_id(*b)}") for a, b in pairs]


PAIRS = _chain_pairs()


def ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=bool)


def alone(splitter):
    """bytes -> mask with an all-True parent (the splitter reads bytes directly)."""
    return lambda data: splitter.boundaries(data, ones(len(data)))


def chained(*splitters):
    """bytes -> (n, len) masks, each splitter's output the next one's parent."""
    return lambda data: split_document(list(splitters), data)


def prefix_mismatch(split, x: bytes, y: bytes) -> list[int]:
    """Positions before len(x) where ``split(x + y)`` disagrees with ``split(x)``."""
    whole, part = np.asarray(split(x + y)), np.asarray(split(x))
    assert whole.shape[:-1] == part.shape[:-1] and whole.shape[-1] == len(x + y) and part.shape[-1] == len(x)
    if not x:
        return []
    diff = (whole[..., : len(x)] != part).reshape(-1, len(x))
    return np.flatnonzero(diff.any(axis=0)).tolist()


def check_prefix_stable(split, x: bytes, y: bytes) -> None:
    bad = prefix_mismatch(split, x, y)
    assert not bad, f"appending {y!r} to {x!r} changed the boundaries at byte positions {bad}"


# -------------------------------------------------------------- contract: shape, dtype, subset


@pytest.mark.parametrize("name, options", SPLITTERS)
@settings(max_examples=40)
@given(case=with_parent())
def test_result_is_a_bool_mask_inside_the_parent(name, options, case):
    data, parent = case
    splitter = make_splitter(name, options)
    for par in (parent, ones(len(data))):
        before = par.copy()
        out = splitter.boundaries(data, par)
        assert isinstance(out, np.ndarray) and out.dtype == np.bool_ and out.shape == (len(data),)
        assert not (out & ~par).any(), "boundaries outside the parent mask"
        assert np.array_equal(par, before), "the parent mask was modified"


@pytest.mark.parametrize("name, options", SPLITTERS)
def test_empty_input(name, options):
    out = make_splitter(name, options).boundaries(b"", ones(0))
    assert out.shape == (0,) and out.dtype == np.bool_


# -------------------------------------------------------------- stability


@pytest.mark.parametrize("name, options", SPLITTERS)
@settings(max_examples=60)
@given(x=documents, y=documents)
@example(x=b"a  ", y=b"\nb")  # AU-Net's reference splitting promotes the first space here
@example(x=b"a \t", y=b"\n\nb")
@example(x=b"word ", y=b" word")
@example(x=b"12", y=b"345")
@example(x=b"a.", y=b"..b")
@example(x="中文".encode()[:4], y="中文".encode()[4:])
def test_stable_under_appending(name, options, x, y):
    check_prefix_stable(alone(make_splitter(name, options)), x, y)


@pytest.mark.parametrize("name, options", SPLITTERS)
@settings(max_examples=30)
@given(left=with_parent(), right=with_parent())
def test_stable_under_appending_with_any_parent(name, options, left, right):
    (x, px), (y, py) = left, right
    parent = np.concatenate([px, py])
    splitter = make_splitter(name, options)
    check_prefix_stable(lambda data: splitter.boundaries(data, parent[: len(data)].copy()), x, y)


@pytest.mark.parametrize("first, second", PAIRS)
@settings(max_examples=8)
@given(x=documents, y=documents)
@example(x=b"a  ", y=b"\nb")
def test_chained_splitters_are_stable(first, second, x, y):
    check_prefix_stable(chained(make_splitter(*first), make_splitter(*second)), x, y)


@pytest.mark.parametrize("first, second", PAIRS)
def test_chain_is_nested(first, second):
    data = b"The cat sat,  on 12345 mats.\n\nA  \n b\t(c) 'd' " * 3
    masks = chained(make_splitter(*first), make_splitter(*second))(data)
    assert not (masks[1] & ~masks[0]).any()


# -------------------------------------------------------------- chunks


def chunks_of(data: bytes, parent: np.ndarray, sizes: list[int]):
    """(chunk, its parent marks) covering ``data`` in order, the sizes repeated as needed."""
    at, i = 0, 0
    while at < len(data):
        size = sizes[i % len(sizes)]
        yield data[at : at + size], parent[at : at + size]
        at, i = at + size, i + 1


@pytest.mark.parametrize("name, options", SPLITTERS)
@settings(max_examples=15)
@given(case=with_parent(st.lists(st.one_of(documents, long_words), min_size=1, max_size=3).map(b"".join)),
       sizes=st.lists(st.integers(1, 16), min_size=1, max_size=6), any_parent=st.booleans())
@example(case=("中文 x😀".encode(), np.ones(10, dtype=bool)), sizes=[1, 2], any_parent=False)  # cut inside characters
@example(case=(b"a" * 100 + b" b", np.ones(102, dtype=bool)), sizes=[7], any_parent=False)  # a word longer than a chunk
@example(case=(b"one. two! 3 four five six\n", np.ones(26, dtype=bool)), sizes=[4, 5], any_parent=False)  # ". " cut
def test_chunked_evaluation_equals_the_whole_document(name, options, case, sizes, any_parent):
    data, parent = case
    parent = parent if any_parent else ones(len(data))
    splitter = make_splitter(name, options)
    whole = splitter.boundaries(data, parent.copy())
    scan = splitter.scan()
    fed = [np.asarray(scan.feed(chunk, marks.copy()), dtype=bool) for chunk, marks in chunks_of(data, parent, sizes)]
    got = np.concatenate(fed) if fed else np.zeros(0, dtype=bool)
    assert np.array_equal(got, whole), f"chunks of {sizes} bytes differ at {np.flatnonzero(got != whole).tolist()}"
    chain = [make_splitter("regex", {"preset": "word"}), splitter]  # as a later stage, after the word preset
    scan = ChainScan(chain)
    fed = [scan.feed(chunk) for chunk, _ in chunks_of(data, parent, sizes)]
    got = np.concatenate(fed, axis=1) if fed else np.zeros((2, 0), dtype=bool)
    assert np.array_equal(got, split_document(chain, data))


@pytest.mark.parametrize("name, options", SPLITTERS)
def test_identity_names_options_and_code(name, options):
    """What keys prepared data: the deciding options and the code (class, version, source digest)."""
    import json

    splitter = make_splitter(name, options)
    identity = splitter.identity()
    json.dumps(identity)  # stored in preparation.json and manifests
    code, cls = identity["code"], type(splitter)
    assert isinstance(code["version"], int) and len(code["source_sha256"]) == 64
    assert code["class"] == f"{cls.__module__}:{cls.__qualname__}"
    if name == "entropy":  # the model by its content; where the work runs is no part of it
        assert set(identity["options"]["checkpoint"]) == {"sha256"} and "device" not in identity["options"]


def test_generic_scans_cover_every_way_a_splitter_gives_its_rule():
    """A splitter with a bounded context is re-run on an overlap, one with a state is stepped, any
    other is held whole, and all agree with the whole document."""
    from unetlm.splitters.base import OverlapScan, Splitter, StateScan, WholeScan

    space = make_splitter("space", {})

    class Bounded(Splitter):
        context = 2
        boundaries = staticmethod(space.boundaries)

    class Unbounded(Splitter):
        boundaries = staticmethod(space.boundaries)

    class Stepped(Splitter):
        start = staticmethod(space.start)

    data = "ab  c, 中 d\n".encode() * 3
    for cls, kind in ((Bounded, OverlapScan), (Unbounded, WholeScan), (Stepped, StateScan)):
        splitter = cls(None)
        assert isinstance(splitter.scan(), kind)
        scan = splitter.scan()
        got = np.concatenate([scan.feed(c, p) for c, p in chunks_of(data, ones(len(data)), [3, 1, 5])])
        assert np.array_equal(got, space.boundaries(data, ones(len(data)))), cls.__name__
    with pytest.raises(NotImplementedError, match="defines none of boundaries, scan or start"):
        Splitter(None).scan()


# -------------------------------------------------------------- the property finds real flaws

# GPT-2's pre-tokenizer: a boundary at the start of each pre-token. ``\s+(?!\S)`` leaves the
# last space of a run to the next word, so a space's fate depends on the byte after it.
GPT2_PRETOKENS = regex.compile(rb" ?\w+| ?\d+| ?[^\s\w\d]+|\s+(?!\S)|\s+")


class PretokenStartSplitter:
    """Deliberately unstable (never registered): boundaries at GPT-2 pre-token starts."""

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        out = np.zeros(len(data), dtype=bool)
        for m in GPT2_PRETOKENS.finditer(data):
            out[m.start()] = True
        return out & parent


class LastSpaceSplitter:
    """Deliberately unstable (never registered): a boundary at the last whitespace of a run."""

    def boundaries(self, data: bytes, parent: np.ndarray) -> np.ndarray:
        out = np.zeros(len(data), dtype=bool)
        for m in regex.finditer(rb"\s(?!\s)", data):
            out[m.start()] = True
        return out & parent


@pytest.mark.parametrize("unstable", [PretokenStartSplitter(), LastSpaceSplitter()], ids=lambda s: type(s).__name__)
def test_stability_check_finds_a_lookahead_splitter(unstable):
    x, y = find(
        st.tuples(documents, documents),
        lambda xy: bool(prefix_mismatch(alone(unstable), *xy)),
        settings=settings(max_examples=300, derandomize=True, database=None),
    )
    with pytest.raises(AssertionError, match="changed the boundaries"):
        check_prefix_stable(alone(unstable), x, y)


def test_stability_check_finds_an_unstable_chain():
    word = make_splitter("regex", {"preset": "word"})
    x, y = find(
        st.tuples(rich_bytes, rich_bytes),
        lambda xy: bool(prefix_mismatch(chained(word, PretokenStartSplitter()), *xy)),
        settings=settings(max_examples=300, derandomize=True, database=None),
    )
    with pytest.raises(AssertionError):
        check_prefix_stable(chained(word, PretokenStartSplitter()), x, y)


# -------------------------------------------------------------- the AU-Net presets


@settings(max_examples=60)
@given(data=documents)
@example(data=b"a  \nb c d e f g h i j")
def test_word_presets_are_nested(data):
    word, word2, word4 = (alone(make_splitter("regex", {"preset": p}))(data) for p in ("word", "word2", "word4"))
    assert not (word2 & ~word).any()
    assert not (word4 & ~word2).any()


@pytest.mark.parametrize("preset", ["word", "word2", "word4"])
def test_newline_after_spaces_promotes_nothing(preset):
    splitter = make_splitter("regex", {"preset": preset})
    before = alone(splitter)(b"a  ")
    after = alone(splitter)(b"a  \nb")
    assert np.array_equal(after[:3], before)


def test_word_preset_marks_words_punctuation_and_digit_groups():
    data = b"hi  there, 1234567\nok"
    got = np.flatnonzero(alone(make_splitter("regex", {"preset": "word"}))(data)).tolist()
    # space after "hi"; "," ; space after ","; digit groups start at 1, 4, 7 of "1234567"; newline
    assert got == [2, 9, 10, 11, 14, 17, 18]


# -------------------------------------------------------------- splitting packed rows


def _packed_row(docs: list[bytes], pad: int) -> tuple[np.ndarray, np.ndarray]:
    tokens, doc = [], []
    for i, d in enumerate(docs):
        tokens += [BOS, *d]
        doc += [i + 1] * (len(d) + 1)
    return np.array(tokens + [PAD] * pad), np.array(doc + [len(docs)] * pad)


@pytest.mark.parametrize("name, options", SPLITTERS)
@settings(max_examples=20)
@given(docs=st.lists(documents, min_size=1, max_size=3), pad=st.integers(0, 3))
def test_packed_documents_are_split_independently(name, options, docs, pad):
    splitters = [make_splitter(name, options), make_splitter("regex", {"preset": "word2"})]
    tokens, doc = _packed_row(docs, pad)
    masks = split_row(splitters, tokens, doc)
    start = 0
    for d in docs:
        assert masks[:, start].all(), "a BOS token is a boundary at every stage"
        assert np.array_equal(masks[:, start + 1 : start + 1 + len(d)], split_document(splitters, d))
        start += len(d) + 1
    assert not masks[:, start:].any(), "padding is never a boundary"
