"""``unetlm eval``: bits per byte, multiple choice, CUTE-style tasks, bootstrap intervals, CLI.

* The window plan scores every byte exactly once with at least ``seq_len - stride`` bytes of
  context after the first window; per-file bits/byte equals the model's own loss on the same
  bytes, computed here by independent forwards (one window, and disjoint windows that start
  mid-document with the whole document's boundaries).
* Choice NLLs equal independent forwards (also past seq_len); the prediction is the lowest NLL
  per character, not per choice.
* Task generators give the right answers on fixed words and are deterministic in the seed.
* Bootstrap intervals contain the estimate and narrow with more samples; the CLI writes JSON.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import unetlm
from unetlm.cli import main
from unetlm.eval import choice as choice_mod
from unetlm.eval import cute
from unetlm.eval.bootstrap import bootstrap_ci, ratio
from unetlm.eval.bpb import file_bpb, text_bpb, token_nll, window_plan
from unetlm.eval.choice import continuation_nll, evaluate_choice, predict
from unetlm.splitters.splitting import split_document
from unetlm.core.tokens import encode

ROOT = Path(__file__).resolve().parents[1]
SEQ = 64
OVERRIDES = [
    f"model.seq_len={SEQ}", f"model.stages[0].max_len={SEQ}", "model.stages[0].dim=32", "model.stages[0].layers=1",
    "model.stages[0].mixer.window=16", "model.stages[1].dim=32", "model.stages[1].layers=1",
    "model.stages[1].max_len=40",
]
TEXT = b"The cat sat on the mat. A dog ran far; \xc3\xa9t\xc3\xa9 \xe2\x82\xac 42!\n"
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    recipe = unetlm.load_recipe(ROOT / "recipes" / "tiny" / "au2.toml", OVERRIDES)
    torch.manual_seed(0)
    model = unetlm.build_model(recipe)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "recipe": recipe.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return unetlm.load_checkpoint(checkpoint)[0]


def whole_document_masks(model, data: bytes) -> list[torch.Tensor]:
    """Boundaries of BOS + data computed over the whole document, (S-1, len(data) + 1)."""
    inner = split_document(model.splitters, data)
    return [torch.from_numpy(np.concatenate([[True], m])) for m in inner]


def forward_nll(model, tokens: torch.Tensor, masks: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per-target NLL (T,) of one row read as a single document."""
    with torch.no_grad():
        out = model(tokens[None], torch.zeros_like(tokens)[None], [m[None] for m in masks])
    return F.cross_entropy(out.logits[0].float(), targets, reduction="none").double()


# --- bits per byte ---------------------------------------------------------------------------


@settings(max_examples=60)
@given(n=st.integers(1, 400), seq_len=st.integers(1, 64), data=st.data())
def test_window_plan_scores_every_byte_once_with_context(n, seq_len, data):
    stride = data.draw(st.integers(1, seq_len))
    plan = window_plan(n, seq_len, stride)
    scored = np.zeros(n, dtype=int)
    for w, (start, first) in enumerate(plan):
        assert 0 <= start and (w == 0 or start + seq_len <= n)
        stop = min(start + seq_len, n)
        scored[start + first : stop] += 1
        if w > 0:
            assert first >= seq_len - stride  # bytes of context before the first scored byte
    assert (scored == 1).all()


def test_bpb_of_a_short_file_is_the_models_own_loss(model, tmp_path):
    data = TEXT[: SEQ - 5]
    path = tmp_path / "short.txt"
    path.write_bytes(data)
    row = file_bpb(model, path, resamples=200)
    tokens = encode(data)
    with torch.no_grad():
        loss = float(model(tokens[None, :-1], targets=tokens[None, 1:]).loss)
    assert row.bytes == len(data) and row.windows == 1 and row.truncated == 0
    assert row.bits_per_byte == pytest.approx(loss / LN2, rel=1e-5)


def test_bpb_with_disjoint_windows_matches_independent_forwards(model, tmp_path):
    data = (TEXT * 4)[: 3 * SEQ]
    path = tmp_path / "long.txt"
    path.write_bytes(data)
    row = file_bpb(model, path, stride=SEQ, batch_size=2, resamples=200)
    tokens, masks = encode(data), whole_document_masks(model, data)
    total = 0.0
    for s in range(0, len(data), SEQ):  # windows 1 and 2 start mid-document, without BOS
        total += float(forward_nll(model, tokens[s : s + SEQ], [m[s : s + SEQ] for m in masks],
                                   tokens[s + 1 : s + SEQ + 1]).sum())
    assert row.windows == 3 and row.bytes == 3 * SEQ
    assert row.bits_per_byte == pytest.approx(total / len(data) / LN2, rel=1e-5)
    low, high = row.ci
    assert math.isfinite(low) and low <= row.bits_per_byte <= high


def test_bpb_stride_only_changes_bytes_after_the_first_window(model):
    data = (TEXT * 4)[: 3 * SEQ + 7]
    disjoint, _, _, _ = token_nll(model, [data], SEQ)
    overlapping, window, _, _ = token_nll(model, [data], SEQ // 4, batch_size=3)
    assert np.isfinite(overlapping).all() and window.max() == len(window_plan(len(data), SEQ, SEQ // 4)) - 1
    np.testing.assert_allclose(overlapping[:SEQ], disjoint[:SEQ], rtol=1e-6)
    assert not np.allclose(overlapping[SEQ:], disjoint[SEQ:])  # more context changes later scores


def test_empty_file_is_an_error(model, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        file_bpb(model, tmp_path / "empty.txt")


# --- multiple choice --------------------------------------------------------------------------


def independent_continuation_nll(model, context: bytes, continuation: bytes) -> float:
    doc = context + continuation
    tokens, masks = encode(doc), whole_document_masks(model, doc)
    start, stop = max(0, len(doc) - SEQ), len(doc)  # inputs end one token before the last target
    nll = forward_nll(model, tokens[start:stop], [m[start:stop] for m in masks], tokens[start + 1 : stop + 1])
    return float(nll[-len(continuation):].sum())


def test_continuation_nll_matches_independent_forwards(model):
    pairs = [(b"The cat sat on the", b" mat."), (b"", b"Hello"), (TEXT * 2, b" dog ran"), (b"A", b"\xc3\xa9t\xc3\xa9")]
    got = continuation_nll(model, pairs, batch_size=3)
    want = [independent_continuation_nll(model, c, x) for c, x in pairs]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_prediction_is_lowest_nll_per_character():
    items = [choice_mod.ChoiceItem("q", ["aaaa", "b"], 0), choice_mod.ChoiceItem("q", ["xy", "z", "\u00e9\u00e9"], 2)]
    # totals favour "b" and "z"; per character (3 for two 2-byte characters) favours "aaaa" and "éé"
    assert predict(items, [4.0, 2.0, 5.0, 2.1, 3.0]) == [0, 2]


def test_evaluate_choice_picks_the_lowest_nll_choice_of_the_model(model, tmp_path):
    raw = [("The cat sat on the", [" mat.", " dog", " 42!"]), ("A dog ran", [" far", " near", " fast"])]
    lines = []
    for context, choices in raw:
        per_char = [independent_continuation_nll(model, context.encode(), c.encode()) / len(c) for c in choices]
        lines.append(json.dumps({"context": context, "choices": choices, "answer": int(np.argmin(per_char))}))
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    row = evaluate_choice(model, path, resamples=100)
    assert row.items == 2 and row.accuracy == 1.0 and row.ci == (1.0, 1.0)


def test_malformed_choice_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = '{"context": "a", "choices": ["b", "c"], "answer": 0}'
    path.write_text(good + '\n{"context": "a", "choices": ["b"], "answer": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        choice_mod.load_choice_items(path)


# --- CUTE-style tasks --------------------------------------------------------------------------


def test_operations_on_fixed_words():
    assert "".join(cute.reverse("hello")) == "olleh"
    assert "".join(cute.insert_after("hello", "l", "x")) == "helxlxo"
    assert "".join(cute.delete("hello", "l")) == "heo"
    assert "".join(cute.swap("hello", "h", "o")) == "oellh"
    assert "".join(cute.substitute("hello", "l", "p")) == "heppo"
    words = "the cat sat on the mat".split()
    assert cute.reverse(words) == "mat the on sat cat the".split()
    assert cute.insert_after(words, "the", "big") == "the big cat sat on the big mat".split()
    assert cute.delete(words, "the") == "cat sat on mat".split()
    assert cute.swap(words, "cat", "mat") == "the mat sat on the cat".split()
    assert cute.substitute(words, "sat", "lay") == "the cat lay on the mat".split()


def test_items_answer_their_questions_and_are_seeded():
    words = ["hello", "world", "apple", "banana", "kiwi", "cherry", "plum", "fig", "grape"]
    for task in cute.TASKS:
        items = cute.make_items(task, words, 5, seed=1, shots=2)
        assert items == cute.make_items(task, words, 5, seed=1, shots=2)
        for item in items:
            assert item.prompt.count("Question: ") == 3 and item.prompt.endswith('Answer: "')
    [item] = cute.make_items("reverse_chars", ["hello"], 1, seed=0, shots=0)
    assert (item.prompt, item.answer) == ('Question: Reverse the letters of "hello".\nAnswer: "', "olleh")
    [item] = cute.make_items("spell_chars", ["hello", "abc"], 1, seed=0, shots=1)
    shot = 'Spell out "abc" with a space between letters.\nAnswer: "a b c"\n\n'
    assert (item.answer, shot in item.prompt) in {("h e l l o", True), ("a b c", False)}
    for item in cute.make_items("reverse_words", words, 5, seed=3, shots=0):
        sentence = item.prompt.split('"')[1]
        assert item.answer == " ".join(sentence.split()[::-1])
    seeds = {tuple(cute.make_items("delete_chars", words, 5, seed=s)) for s in range(3)}
    assert len(seeds) == 3


def test_words_from_text_and_list(tmp_path):
    (tmp_path / "t.txt").write_text("Héllo, world! It's 42.")
    assert cute.words_from_text(tmp_path / "t.txt") == ["Héllo", "world", "It", "s", "42"]
    (tmp_path / "w.txt").write_text("alpha\n\n two words\nsay\"hi\nbeta \n")
    assert cute.words_from_list(tmp_path / "w.txt") == ["alpha", "beta"]


def test_exact_match_scoring(monkeypatch):
    items = cute.make_items("reverse_chars", ["hello", "world", "apple"], 4, seed=0, shots=1)
    given_answers = [items[0].answer.encode(), b"wrong", items[2].answer.encode() + b" ", items[3].answer.encode()]
    monkeypatch.setattr(cute, "greedy_answers", lambda model, items, batch_size=8: given_answers)
    [row] = cute.evaluate_cute(None, items, resamples=200)
    assert row.name == "reverse_chars" and row.items == 4 and row.exact_match == 0.5


def test_greedy_answers_stop_at_the_closing_quote(model):
    items = cute.make_items("swap_chars", ["hello", "world", "apple"], 3, seed=0, shots=1)
    answers = cute.greedy_answers(model, items, batch_size=2)
    assert len(answers) == 3
    for item, answer in zip(items, answers):
        assert b'"' not in answer and len(answer) <= len(item.answer.encode()) + 1


# --- bootstrap ---------------------------------------------------------------------------------


def test_bootstrap_contains_estimate_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    widths = []
    for n in (30, 3000):
        values = (rng.random(n) < 0.6).astype(float)
        low, high = bootstrap_ci(values, resamples=1000, seed=0)
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 4
    assert bootstrap_ci(values, resamples=500, seed=1) == bootstrap_ci(values, resamples=500, seed=1)
    sums, counts = rng.random(40) * 10, rng.integers(1, 20, 40)
    low, high = bootstrap_ci(sums, counts, resamples=1000, seed=0)
    assert low <= ratio(sums, counts) <= high < sums.max()


# --- command line ------------------------------------------------------------------------------


def test_cli_eval_writes_table_and_json(checkpoint, tmp_path, capsys):
    (tmp_path / "en.txt").write_bytes(TEXT * 3)
    (tmp_path / "fr.txt").write_bytes("Le chat est sur le tapis. \u00c9t\u00e9 !\n".encode() * 2)
    (tmp_path / "mc.jsonl").write_text(json.dumps({"context": "The cat", "choices": [" sat", " flew"], "answer": 0}))
    (tmp_path / "words.txt").write_text("hello\nworld\napple\ncat\n")
    out = tmp_path / "out" / "eval.json"
    args = ["eval", str(checkpoint), "--bpb", str(tmp_path / "en.txt"), str(tmp_path / "fr.txt"),
            "--choice", str(tmp_path / "mc.jsonl"), "--cute-words", str(tmp_path / "words.txt"),
            "--cute-tasks", "reverse_chars", "delete_words", "--cute-items", "2", "--shots", "1",
            "--resamples", "100", "--json", str(out)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "bits/byte" in table and "accuracy" in table and "reverse_chars" in table and "95% CI" in table
    result = json.loads(out.read_text())
    assert [Path(r["name"]).name for r in result["bpb"]] == ["en.txt", "fr.txt"]
    for row in result["bpb"]:
        assert math.isfinite(row["bits_per_byte"]) and row["ci"][0] <= row["bits_per_byte"] <= row["ci"][1]
    assert result["bpb"][0]["bytes"] == len(TEXT * 3)
    assert result["choice"][0]["items"] == 1 and result["settings"]["stride"] == SEQ // 2
    assert [r["name"] for r in result["cute"]] == ["reverse_chars", "delete_words"]
    assert all(r["items"] == 2 for r in result["cute"])


def test_cli_eval_rejects_unknown_task(checkpoint, tmp_path, capsys):
    (tmp_path / "words.txt").write_text("hello\n")
    assert main(["eval", str(checkpoint), "--cute-words", str(tmp_path / "words.txt"), "--cute-tasks", "nope"]) == 2
    assert "unknown CUTE task 'nope'" in capsys.readouterr().err


def test_several_documents_score_like_each_alone(model):
    a, b = TEXT * 3, b"A second document, read from its own BOS."
    together = text_bpb(model, "both", [a, b], stride=SEQ // 2)
    alone = [text_bpb(model, n, [d], stride=SEQ // 2) for n, d in (("a", a), ("b", b))]
    bits = sum(r.bits_per_byte * r.bytes for r in alone)
    assert together.bytes == len(a) + len(b) and together.windows == sum(r.windows for r in alone)
    assert together.bits_per_byte == pytest.approx(bits / together.bytes, rel=1e-9)
