"""``unetlm compare`` (a sweep of recipes at one budget): equal budgets, the same held-out text,
resumable runs, leak flags, orderings."""
from __future__ import annotations

import importlib.util
import json
import types

import pytest
import torch
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from unetlm.data.packing import held_out_text, training_text
from unetlm import compare as cmp
from unetlm.core.tokens import BYTES
from unetlm.recipe.schema import DataSpec
from unetlm.sweep import local, score
from unetlm.sweep.directory import SweepDir
from unetlm.sweep.expand import expand
from unetlm.sweep.report import published_ordering, results_markdown
from unetlm.sweep.spec import SweepError
from unetlm.sweep.status import sweep_status

from test_train import tiny_recipe_dict, write_corpus


@given(st.lists(st.binary(max_size=40), max_size=6), st.floats(0.0, 1.0))
def test_training_and_held_out_text_split_every_byte_once(documents, fraction):
    train = training_text(documents, fraction)
    held = held_out_text(documents, fraction)
    trained_on = b"".join(b"\x00" + d for d in train)
    whole = b"".join(b"\x00" + d for d in documents)
    assert whole.startswith(trained_on)
    assert b"".join(held) == b"".join(whole[len(trained_on):].split(b"\x00")) or b"\x00" in b"".join(documents)


def write_recipes(tmp_path, corpus) -> list[str]:
    byte = tiny_recipe_dict(corpus)
    bpe = tiny_recipe_dict(corpus)
    bpe["model"] = {"seq_len": 32, "tokenizer": {"name": "bpe", "vocab_size": 300},
                    "stages": [{"dim": 16, "layers": 1, "mixer": {"name": "attention", "head_dim": 8}}]}
    paths = []
    for name, data in (("au", byte), ("bpe", bpe)):
        del data["data"]
        path = tmp_path / f"{name}.toml"
        path.write_text(tomli_w.dumps(data))
        paths.append(str(path))
    return paths


def plan(paths, budget, data):
    return expand(cmp.comparison(paths, budget, data))


def test_plan_spends_at_most_the_budget_and_names_runs(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    paths = write_recipes(tmp_path, corpus)
    data = DataSpec(source="files", paths=[corpus])
    one = plan(paths[:1], 1e20, data)[0]
    budget = one.flops_per_step * 7.5
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "au.toml"
    other.write_text((tmp_path / "au.toml").read_text())
    runs = plan(paths + [str(other)], budget, data)
    assert [r.name for r in runs] == [f"{tmp_path.name}-au", "bpe", "other-au"]
    for r in runs:
        assert r.steps * r.flops_per_step <= budget < (r.steps + 1) * r.flops_per_step
        assert r.recipe().data == data
    with pytest.raises(SweepError, match="one training step costs"):
        plan(paths, one.flops_per_step / 2, data)
    with pytest.raises(SweepError, match=r"two runs would share the name '.*-au' \(.*au.toml is listed twice\)"):
        plan(paths + paths[:1], budget, data)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    corpus = write_corpus(tmp / "corpus")
    paths = write_recipes(tmp, corpus)
    data = DataSpec(source="files", paths=[corpus], valid_fraction=0.2)
    budget = plan(paths[:1], 1e20, data)[0].flops_per_step * 4
    results = cmp.compare(paths, budget, tmp / "out", data, eval_bytes=3000, cute_items=1, progress=False)
    return paths, budget, data, tmp / "out", results


def test_compare_trains_evaluates_and_writes_its_reports(compared):
    paths, budget, data, out, results = compared
    rows = {r["name"]: r for r in results["rows"]}
    assert set(rows) == {"au", "bpe"}
    for r in rows.values():
        assert r["flops"] <= budget and r["ci"][0] <= r["bpb"] <= r["ci"][1]
        assert r["causal"] and not r["below_floor"] and "spell_chars" in r["tasks"]
    assert rows["bpe"]["bytes_per_token"] > 1.0 == rows["au"]["bytes_per_token"]
    assert rows["au"]["eval_bytes"] == rows["bpe"]["eval_bytes"] and 2990 <= rows["au"]["eval_bytes"] <= 3000
    md = (out / "results.md").read_text()
    assert "| au |" in md and "| bpe |" in md and "CUTE mean" in md and "Sanity floor" in md
    if importlib.util.find_spec("matplotlib"):
        assert (out / "bpb-vs-flops.png").stat().st_size > 10_000 and "](bpb-vs-flops.png)" in md
    else:  # the comparison stands without its figure and says how to get it
        assert not (out / "bpb-vs-flops.png").exists() and "pip install 'unetlm[plot]'" in md
    assert json.loads((out / "results.json").read_text())["rows"][0]["name"] in {"au", "bpe"}


def test_compare_again_neither_trains_nor_evaluates(compared, monkeypatch):
    paths, budget, data, out, results = compared
    monkeypatch.setattr(local, "TrainProcess", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(score, "evaluate_run", lambda *a, **k: pytest.fail("a finished run was evaluated again"))
    again = cmp.compare(paths, budget, out, data, eval_bytes=3000, cute_items=1, progress=False)
    assert [r["bpb"] for r in again["rows"]] == [r["bpb"] for r in results["rows"]]


def test_another_budget_into_the_same_directory_is_refused(compared):
    paths, budget, data, out, _ = compared
    with pytest.raises(SweepError, match=r"holds another sweep \(budgets\[0\]: "):
        cmp.compare(paths, budget * 2, out, data, eval_bytes=3000, progress=False)


def test_ctrl_c_stops_the_comparison_and_a_rerun_continues(compared, tmp_path, monkeypatch):
    paths, budget, data, _, _ = compared
    def ctrl_c():
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(local, "wait_a_moment", ctrl_c)  # as soon as the first run has started
        with pytest.raises(local.SweepInterrupted, match="run the same command again"):
            cmp.compare(paths, budget, tmp_path, data, eval_bytes=1000, progress=False)
    sweep = SweepDir.open(tmp_path)
    assert [s.state for s in sweep_status(sweep)] == ["interrupted", "queued"]  # the next recipe did not start
    assert not (tmp_path / "runs" / "bpe").exists()
    result = cmp.compare(paths, budget, tmp_path, data, eval_bytes=1000, progress=False)
    assert [r["steps"] for r in result["rows"]] == [run.steps for run in sweep.runs]


class Peeking(torch.nn.Module):
    """Logits at t read token t + 1: the leak the probe must catch."""

    def __init__(self, leak: bool) -> None:
        super().__init__()
        self.leak, self.tokenizer = leak, BYTES
        self.table = torch.nn.Embedding(258, 258)

    def forward(self, tokens):
        source = torch.roll(tokens, -1, 1) if self.leak else tokens
        return types.SimpleNamespace(logits=self.table(source))


def test_causality_probe_catches_a_model_that_reads_the_next_token():
    tokens = list(range(40))
    assert score.probe_causality(Peeking(leak=False), tokens, 20)
    assert not score.probe_causality(Peeking(leak=True), tokens, 20)


def test_floor_is_half_of_xz_given_the_training_text():
    text = b"the quick brown fox jumps over the lazy dog. " * 40
    assert score.xz_rate(text, text[:400]) < score.xz_rate(b"", text[:400])  # xz reuses what it has read
    assert score.FLOOR_FACTOR == 0.5


def row(name, bpb, published, ci=0.01):
    return {"name": name, "bpb": bpb, "ci": [bpb - ci, bpb + ci], "published": published}


def test_published_ordering_reports_flips_and_overlaps():
    rows = [row("bpe", 1.00, "subword transformer"), row("spacebyte", 1.05, "SpaceByte"),
            row("au1", 1.04, "byte transformer", ci=0.05), row("au3", 0.9, None)]
    order = published_ordering(rows)
    assert order["ours"] == ["bpe", "au1", "spacebyte"] and not order["holds"]
    assert order["flipped"] == [{"better_published": "spacebyte", "better_here": "au1", "cis_overlap": True}]
    assert published_ordering(rows[:2])["holds"]
    assert order["published_bpb"] == {"subword transformer": 0.989, "byte transformer": 1.138, "SpaceByte": 1.009}


def test_markdown_flags_suspect_and_leaking_rows():
    base = {"params": 1, "flops_per_byte": 1e6, "steps": 1, "bytes_seen": 10, "tasks": {}, "eval_bytes": 100,
            "causal": True, "below_floor": False}
    rows = [row("ok", 2.0, None) | base, row("low", 0.3, None) | base | {"below_floor": True},
            row("leak", 1.5, None) | base | {"causal": False}]
    results = {"rows": rows, "settings": {"flops": 1e9}, "floor": {"factor": 0.5, "xz_bits_per_byte": 2.4, "floor": 1.2},
               "ordering": published_ordering(rows)}
    md = results_markdown(results)
    assert "| low |" in md and "SUSPECT: below the floor 1.200" in md.split("| low |")[1].split("\n")[0]
    assert "LEAK" in md.split("| leak |")[1].split("\n")[0]
    assert "SUSPECT" not in md.split("| ok |")[1].split("\n")[0]


def test_cli_rejects_a_bad_budget(capsys):
    from unetlm.cli import main

    assert main(["compare", "recipes/tiny/au1.toml", "--flops", "-1"]) == 2
    assert "--flops '-1'" in capsys.readouterr().err
