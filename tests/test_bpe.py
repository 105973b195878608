"""The BPE baseline: exact byte round trips, training-split-only tokenizers, per-byte losses and FLOPs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("tokenizers", reason="the BPE baseline needs the tokenizers package (unetlm[bpe])")

from unetlm.api import load_checkpoint
from unetlm.data.bpe import BpeTokenizer, byte_level_chars
from unetlm.data.packing import pack, text_prefix, training_cut, training_text
from unetlm.data.windows import StreamCorpus, split_point
from unetlm.eval.bpb import text_bpb
from unetlm.eval.choice import continuation_nll
from unetlm.model.generate import generate
from unetlm.model.summary import summarize
from unetlm.core.tokens import BOS, BYTES, PAD
from unetlm.recipe import RecipeError, recipe_from_dict
from unetlm.train import loop
from unetlm.train.metrics import read_metrics

from strategies import small_tokenizer
from test_train import saved, interrupt_at, tiny_recipe_dict, write_corpus


@pytest.fixture(scope="module")
def tok() -> BpeTokenizer:
    return small_tokenizer(600)


def test_byte_level_chars_are_a_bijection_onto_printable_characters():
    chars = byte_level_chars()
    assert len(set(chars)) == 256
    assert all(c.isprintable() and not c.isspace() for c in chars)
    assert chars[ord("a")] == "a" and chars[ord(" ")] == "\u0120"  # GPT-2's "Ġ"


@given(st.binary(max_size=200))
def test_any_bytes_round_trip(data):
    tok = small_tokenizer(600)
    ids = tok.encode(data)
    assert tok.decode(ids) == data
    assert ids.dtype == np.int64 and not np.isin(ids, [BOS, PAD]).any()
    assert int(tok.lengths[ids].sum()) == len(data)


def test_ids_below_258_keep_their_byte_meaning(tok):
    assert tok.encode(b"\xff").tolist() == [255]  # invalid UTF-8 is data: one byte token
    assert tok.encode(b"Q").tolist() == [ord("Q")]
    assert tok.piece(BOS) == b"" and tok.piece(PAD) == b"" and tok.lengths[BOS] == 1 and tok.lengths[PAD] == 0
    merged = tok.encode(b" the the the")
    assert merged.max() >= 258 and len(merged) < len(b" the the the")


def test_saved_tokenizer_encodes_the_same(tok):
    again = BpeTokenizer.from_json(tok.to_json())
    text = "Return the value of the named attribute of object; naïve café \u65e5\u672c".encode() + b"\x80\xfe"
    assert again.encode(text).tolist() == tok.encode(text).tolist()
    assert again.bytes_per_token == tok.bytes_per_token > 1.5


@given(st.lists(st.binary(max_size=30), max_size=8), st.integers(0, 300))
def test_text_prefix_holds_exactly_the_first_stream_bytes(documents, n):
    stream = b"".join(b"\x00" + d for d in documents)  # \x00 stands for each BOS
    prefix = b"".join(b"\x00" + d for d in text_prefix(documents, n))
    assert stream[:n] in (prefix, prefix + b"\x00")  # a BOS with nothing after it is dropped


def test_byte_and_bpe_models_hold_out_the_same_text(tok):
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog. ".encode() * (i + 3) for i in range(12)]
    byte_data = StreamCorpus(pack(docs, []), BYTES.lengths)
    bpe_data = StreamCorpus(pack(docs, [], tok), tok.lengths)
    byte_cut, bpe_cut = split_point(byte_data, 0.25), split_point(bpe_data, 0.25)
    held_bytes = BYTES.decode(byte_data.stream.tokens[byte_cut:])
    held_bpe = tok.decode(bpe_data.stream.tokens[bpe_cut:])
    assert held_bpe.endswith(held_bytes[-50:]) and abs(len(held_bpe) - len(held_bytes)) < 16
    cut = training_cut(sum(len(d) + 1 for d in docs), 0.25)
    assert byte_cut == cut
    # the tokenizer's text stops where the held-out part starts (a BOS with nothing after it is dropped)
    assert sum(len(d) + 1 for d in training_text(docs, 0.25)) in (cut, cut - 1)


def test_pieces_are_tokenized_apart(tok):
    joined = pack([b" the theory"], [], tok).tokens
    apart = pack([(b" the", b" theory")], [], tok).tokens
    assert apart.tolist() == [BOS, *tok.encode(b" the").tolist(), *tok.encode(b" theory").tolist()]
    assert tok.decode(joined) == tok.decode(apart)


def bpe_recipe(corpus: str, **training):
    data = tiny_recipe_dict(corpus, **training)
    data["model"] = {
        "seq_len": 32,
        "tokenizer": {"name": "bpe", "vocab_size": 300},
        "stages": [{"dim": 16, "layers": 1, "mixer": {"name": "attention", "head_dim": 8}}],
    }
    return recipe_from_dict(data)


def test_a_tokenized_model_has_one_stage():
    data = tiny_recipe_dict("x/*.txt")
    data["model"]["tokenizer"] = {"name": "bpe", "vocab_size": 512}
    with pytest.raises(RecipeError, match="model.tokenizer: a tokenized model has one stage"):
        recipe_from_dict(data)
    data["model"]["tokenizer"] = {"name": "bpe", "vocab_size": 100}
    data["model"]["stages"] = data["model"]["stages"][:1]
    with pytest.raises(RecipeError, match=r"model.tokenizer.vocab_size = 100 is invalid"):
        recipe_from_dict(data)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("bpe-corpus"))
    out = tmp_path_factory.mktemp("bpe-run")
    loop.train(bpe_recipe(corpus, steps=6), out, progress=False, sample=False)
    return corpus, out


def test_training_saves_the_tokenizer_and_reports_bits_per_byte(bpe_run):
    corpus, out = bpe_run
    state = saved(out)
    written = BpeTokenizer.from_json((out / "tokenizer.json").read_text())
    assert BpeTokenizer.from_json(state["tokenizer"]).to_json() == written.to_json()
    model, recipe = load_checkpoint(out)
    assert model.tokenizer.to_json() == written.to_json() and model.head.out_features == 300
    records = read_metrics(out / "metrics.jsonl")
    last = records[-1]
    per_token_bits = last["loss"] / math.log(2)
    # a token stands for more than one byte, so a byte costs fewer bits than a token
    assert 1.3 < per_token_bits / last["bpb"] < written.bytes_per_token * 1.5
    flops_per_byte = summarize(model).train_flops_per_byte
    assert last["flops"] == pytest.approx(last["bytes"] * flops_per_byte)
    assert flops_per_byte == pytest.approx(summarize(model).train_flops_per_token / written.bytes_per_token)


def test_validation_bits_per_byte_is_total_nats_over_held_out_bytes(bpe_run):
    corpus, out = bpe_run
    model, recipe = load_checkpoint(out)
    model.double()
    data = b"the byte model pools words into coarser stages then back. " * 3
    row = text_bpb(model, "text", [data], stride=32)
    ids = torch.tensor([[BOS, *model.tokenizer.encode(data).tolist()]])
    logits = model(ids[:, :32]).logits[0]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:33], reduction="sum")
    if ids.shape[1] <= 33:  # one window: the whole text
        assert row.bits_per_byte == pytest.approx(float(nll) / len(data) / math.log(2), rel=1e-6)
    assert row.bytes == len(data) and row.ci[0] <= row.bits_per_byte <= row.ci[1]


def test_continuation_scores_only_the_continuations_tokens(bpe_run):
    corpus, out = bpe_run
    model, _ = load_checkpoint(out)
    model.double()
    context, continuation = b"the model learns", b" words from text"
    got = continuation_nll(model, [(context, continuation)])[0]
    a, b = model.tokenizer.encode(context).tolist(), model.tokenizer.encode(continuation).tolist()
    ids = torch.tensor([[BOS, *a, *b]])
    logp = model(ids).logits[0].detach().log_softmax(-1)
    want = -sum(float(logp[len(a) + i, t]) for i, t in enumerate(b))
    assert got == pytest.approx(want, rel=1e-6)  # scores go through float32 logits


def test_generation_decodes_tokens_to_bytes_cached_equals_recompute(bpe_run):
    corpus, out = bpe_run
    model, _ = load_checkpoint(out)
    prompts = [b"the byte", b"\xff words"]
    cached = generate(model, prompts, 40, temperature=0.9, seed=3)
    recomputed = generate(model, prompts, 40, temperature=0.9, seed=3, cached=False)
    assert list(cached) == list(recomputed)
    for text, reason in zip(cached, cached.reasons):
        assert len(text) <= 40 and (reason != "length" or len(text) == 40)


def test_stop_string_inside_a_multi_byte_token_cuts_there(bpe_run):
    corpus, out = bpe_run
    model, _ = load_checkpoint(out)
    free = generate(model, [b"the"], 30, temperature=0, seed=0)[0]
    stop = free[3:5]
    cut = generate(model, [b"the"], 30, temperature=0, seed=0, stop=[stop])
    assert cut[0] == free[: free.find(stop)] and cut.reasons == ["stop"]


def test_resume_keeps_the_tokenizer_and_equals_uninterrupted(bpe_run, tmp_path, monkeypatch):
    corpus, out = bpe_run
    recipe = bpe_recipe(corpus, steps=6)
    with monkeypatch.context() as m:
        interrupt_at(m, 4)
        loop.train(recipe, tmp_path, progress=False, sample=False)
    before = saved(tmp_path)["tokenizer"]
    monkeypatch.setattr(BpeTokenizer, "train", None)  # resuming must not learn a new tokenizer
    loop.train(recipe, tmp_path, resume=True, progress=False, sample=False)
    assert saved(tmp_path)["tokenizer"] == before
    full = read_metrics(out / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], abs=1e-6)
