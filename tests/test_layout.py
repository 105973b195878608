"""``unetlm.core.layout``: hand-made examples, and ``link`` against a plain-Python reference."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unetlm.core.layout import PAD_DOC, build_links, byte_stage, link


def row(values, dtype=torch.long) -> torch.Tensor:
    return torch.tensor([values], dtype=dtype)


def stage(doc, valid=None):
    doc = row(doc)
    valid = torch.ones_like(doc, dtype=torch.bool) if valid is None else row(valid, torch.bool)
    return byte_stage(doc, valid)


def as_list(t: torch.Tensor) -> list:
    return t[0].tolist()


# ------------------------------------------------------------------- hand-made examples


def test_boundaries_become_coarse_positions():
    # bytes:  B  a  b  _  c  d  _  e      (B: BOS, _: a boundary byte)
    lk = link(stage([1] * 8), row([1, 0, 0, 1, 0, 0, 1, 0], torch.bool), coarse_len=4)
    assert as_list(lk.fine_is_boundary) == [True, False, False, True, False, False, True, False]
    assert as_list(lk.coarse_src)[:3] == [0, 3, 6]
    assert as_list(lk.coarse.byte_pos)[:3] == [0, 3, 6]
    assert as_list(lk.coarse.valid) == [True, True, True, False]
    assert as_list(lk.coarse.doc) == [1, 1, 1, PAD_DOC]
    assert as_list(lk.fine_seg) == [1, 1, 1, 2, 2, 2, 3, 3]
    assert as_list(lk.fine_offset) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert lk.truncated.tolist() == [0]


def test_truncation_keeps_the_first_boundaries_and_counts_the_rest():
    lk = link(stage([1] * 8), row([1, 0, 0, 1, 0, 0, 1, 1], torch.bool), coarse_len=2)
    assert as_list(lk.coarse_src) == [0, 3]
    assert as_list(lk.coarse.valid) == [True, True]
    assert as_list(lk.fine_seg) == [1, 1, 1, 2, 2, 2, 2, 2]  # the newest kept vector
    assert as_list(lk.fine_offset) == [0, 1, 2, 0, 1, 2, 3, 4]
    assert lk.truncated.tolist() == [2]


def test_document_change_without_boundary_gives_the_start_vector():
    lk = link(stage([1, 1, 1, 2, 2, 2]), row([1, 0, 0, 0, 1, 0], torch.bool), coarse_len=4)
    assert as_list(lk.fine_seg) == [1, 1, 1, 0, 2, 2]  # position 3 may not see document 1's vector
    assert as_list(lk.fine_offset)[4:] == [0, 1]
    assert as_list(lk.coarse.doc)[:2] == [1, 2]


def test_document_change_at_a_boundary():
    lk = link(stage([1, 1, 1, 2, 2, 2]), row([1, 0, 0, 1, 0, 0], torch.bool), coarse_len=4)
    assert as_list(lk.fine_seg) == [1, 1, 1, 2, 2, 2]
    assert as_list(lk.fine_offset) == [0, 1, 2, 0, 1, 2]


def test_truncated_document_start_gives_the_start_vector():
    lk = link(stage([1, 1, 1, 2, 2, 2]), row([1, 0, 0, 1, 0, 0], torch.bool), coarse_len=1)
    assert as_list(lk.fine_seg) == [1, 1, 1, 0, 0, 0]  # never document 1's vector
    assert lk.truncated.tolist() == [1]


def test_padding_is_never_a_boundary_nor_sees_one():
    info = stage([1, 1, 1, 1, 1, 1], valid=[1, 1, 1, 1, 0, 0])
    assert as_list(info.doc) == [1, 1, 1, 1, PAD_DOC, PAD_DOC]
    lk = link(info, row([1, 0, 1, 0, 1, 1], torch.bool), coarse_len=4)
    assert as_list(lk.coarse.valid) == [True, True, False, False]
    assert as_list(lk.fine_is_boundary) == [True, False, True, False, False, False]
    assert as_list(lk.fine_seg) == [1, 1, 2, 2, 0, 0]
    assert lk.truncated.tolist() == [0]


def test_nested_links_index_the_previous_stage():
    masks = [row([1, 0, 1, 1, 0, 1, 0, 1], torch.bool), row([1, 0, 0, 1, 0, 0, 0, 1], torch.bool)]
    first, second = build_links(row([1] * 8), torch.ones(1, 8, dtype=torch.bool), masks, [5, 3])
    assert as_list(first.coarse.byte_pos) == [0, 2, 3, 5, 7]
    assert second.fine is first.coarse
    assert as_list(second.coarse_src) == [0, 2, 4]  # indices into stage 1
    assert as_list(second.coarse.byte_pos) == [0, 3, 7]
    assert as_list(second.fine_seg) == [1, 1, 2, 2, 3]
    assert as_list(second.fine_offset) == [0, 1, 0, 1, 0]


def test_a_byte_mask_outside_the_fine_stage_is_ignored():
    masks = [row([1, 0, 1, 0], torch.bool), row([1, 1, 1, 1], torch.bool)]
    _, second = build_links(row([1] * 4), torch.ones(1, 4, dtype=torch.bool), masks, [4, 4])
    assert as_list(second.coarse.valid) == [True, True, False, False]  # bytes 1, 3 are not in stage 1


# ------------------------------------------------------------------- against a reference


def reference_link(byte_pos, valid, doc, mask, coarse_len):
    """One row of :func:`link`, spelled out position by position."""
    fine_doc = [d if v else PAD_DOC for d, v in zip(doc, valid)]
    bounds = [j for j in range(len(byte_pos)) if valid[j] and mask[byte_pos[j]]]
    kept = bounds[:coarse_len]
    seg, offset = [], []
    for j in range(len(byte_pos)):
        k = sum(1 for b in kept if b <= j) - 1  # the newest kept boundary at or before j
        if k >= 0 and fine_doc[kept[k]] == fine_doc[j]:
            seg.append(k + 1)
            offset.append(j - kept[k])
        else:  # the start vector, at the steps since the document's first position in the row
            start = j
            while start > 0 and fine_doc[start - 1] == fine_doc[j]:
                start -= 1
            seg.append(0)
            offset.append(j - start)
    return {
        "is_boundary": [j in bounds for j in range(len(byte_pos))],
        "src": kept,
        "byte_pos": [byte_pos[j] for j in kept],
        "coarse_doc": [fine_doc[j] for j in kept] + [PAD_DOC] * (coarse_len - len(kept)),
        "valid": [k < len(kept) for k in range(coarse_len)],
        "seg": seg,
        "offset": offset,
        "truncated": max(0, len(bounds) - coarse_len),
    }


@st.composite
def batches(draw):
    """(doc, valid, mask, coarse_len): rows of documents (ids non-decreasing), padding at the end."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    docs, valids, masks = [], [], []
    for _ in range(B):
        steps = draw(st.lists(st.booleans(), min_size=T, max_size=T))
        docs.append(torch.tensor(steps).long().cumsum(0).tolist())
        n = draw(st.integers(0, T))
        valids.append([j < n for j in range(T)])
        masks.append(draw(st.lists(st.booleans(), min_size=T, max_size=T)))
    lengths = draw(st.lists(st.integers(1, T + 2), min_size=1, max_size=3))
    return torch.tensor(docs), torch.tensor(valids), torch.tensor(masks), lengths


@settings(max_examples=60)
@given(case=batches())
def test_link_matches_the_reference(case):
    doc, valid, mask, lengths = case
    info = byte_stage(doc, valid)
    lk = link(info, mask, lengths[0])
    positions = list(range(doc.shape[1]))
    for b in range(doc.shape[0]):
        ref = reference_link(positions, valid[b].tolist(), doc[b].tolist(), mask[b].tolist(), lengths[0])
        n = len(ref["src"])
        assert lk.fine_is_boundary[b].tolist() == ref["is_boundary"]
        assert lk.coarse_src[b, :n].tolist() == ref["src"]
        assert lk.coarse.byte_pos[b, :n].tolist() == ref["byte_pos"]
        assert lk.coarse.valid[b].tolist() == ref["valid"]
        assert lk.coarse.doc[b].tolist() == ref["coarse_doc"]
        assert lk.fine_seg[b].tolist() == ref["seg"]
        assert lk.fine_offset[b].tolist() == ref["offset"]
        assert int(lk.truncated[b]) == ref["truncated"]


@settings(max_examples=40)
@given(case=batches())
def test_nested_links_are_causal_and_consistent(case):
    doc, valid, mask, lengths = case
    lengths = sorted(lengths, reverse=True)
    masks = [mask] * len(lengths)  # the same byte mask: every stage keeps what the previous kept
    links = build_links(doc, valid, masks, lengths)
    for lk in links:
        Lf = lk.fine_seg.shape[1]
        has = lk.fine_seg > 0
        newest = (lk.fine_seg - 1).clamp(min=0)
        src = lk.coarse_src.gather(1, newest)
        j = torch.arange(Lf).expand_as(src)
        assert bool((~has | (src <= j)).all()), "a fine position sees a coarse vector from its future"
        assert bool((~has | (lk.coarse.doc.gather(1, newest) == lk.fine.doc)).all()), "another document"
        assert bool((~has | lk.coarse.valid.gather(1, newest)).all())
        assert bool((~has | (lk.fine_offset == j - src)).all())
        kept = lk.coarse.valid
        pairs = kept[:, 1:]
        assert bool((~pairs | (lk.coarse_src[:, 1:] > lk.coarse_src[:, :-1])).all()), "coarse order"
        assert bool((lk.coarse.valid.sum(1) + lk.truncated == lk.fine_is_boundary.sum(1)).all())
