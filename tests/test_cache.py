"""The prepared-data cache as users meet it: a plugin's rule edited between runs is prepared
again (never the old masks), a prepared directory of the old rule is refused with the command
to prepare it again, training says which prepared data it reads, and ``unetlm cache`` lists and
clears what the cache holds."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from unetlm.cli import main
from unetlm.data.corpora import cache_lock, open_corpora
from unetlm.data.prepared import PreparedCorpus, PreparedDataError, cache_key
from unetlm.plugins import register_plugin, registry
from unetlm.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''"""A plugin whose rule a user edits between runs."""
import numpy as np

from unetlm.plugins import hookimpl
from unetlm.splitters.base import Splitter

RULE = {rule!r}


class RuleSplitter(Splitter):
    """A boundary where RULE ends, inside the parent."""

    context = len(RULE)

    def boundaries(self, data, parent):
        out = np.zeros(len(data), dtype=bool)
        at = data.find(RULE)
        while at >= 0:
            out[at + len(RULE) - 1] = True
            at = data.find(RULE, at + 1)
        return out & np.asarray(parent, dtype=bool)


@hookimpl
def unetlm_register(registry):
    registry.add("splitter", "edited-rule", "edited_rule:RuleSplitter", "a rule a user edits")
'''


@pytest.fixture
def edited_plugin(tmp_path, monkeypatch):
    """``write(rule)`` (re)writes the plugin module ``edited_rule`` and loads it as a new run would."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("UNETLM_CACHE", str(tmp_path / "cache"))

    def write(rule: bytes):
        (folder / "edited_rule.py").write_text(PLUGIN.format(rule=rule), encoding="utf-8")
        if "edited_rule" in sys.modules:
            return importlib.reload(sys.modules["edited_rule"])
        module = importlib.import_module("edited_rule")
        register_plugin(module, "plugin edited-rule")
        return module

    yield write
    registry().drop_origin("plugin edited-rule")
    sys.modules.pop("edited_rule", None)


def rule_recipe():
    return load_recipe(ROOT / "recipes" / "tiny" / "au2.toml", [
        "model.stages.1.splitter={name = 'edited-rule'}", "data.max_bytes=40000", "training.steps=1",
    ])


def test_an_edited_plugin_rule_is_prepared_again(edited_plugin, tmp_path, capsys):
    from unetlm.train.loop import train

    edited_plugin(b",\n")
    recipe = rule_recipe()
    train(recipe, tmp_path / "run", progress=True, sample=False)
    out = capsys.readouterr().out
    first = Path(out.split("prepared data: preparing ")[1].split(" ")[0])
    assert first.name == cache_key(recipe) and "(new:" in out
    assert out.count("prepared data: ") == 1  # said once, not again when the trainer opens it
    open_corpora(recipe)
    assert f"prepared data: reusing {first} " in capsys.readouterr().out  # the same rule: the same data

    edited_plugin(b", ")  # the user edits the rule and runs again
    recipe = rule_recipe()
    (corpus, _), = open_corpora(recipe)
    assert f"prepared data: preparing {corpus.path} (new:" in capsys.readouterr().out and corpus.path != first
    old = PreparedCorpus.open(first)
    assert not np.array_equal(corpus.read_masks(0, 5000), old.read_masks(0, 5000))  # the new rule's boundaries
    with pytest.raises(PreparedDataError) as info:  # the old directory given as data.prepared
        PreparedCorpus.open(first, recipe)
    message = str(info.value)
    assert message.startswith(f"{first} was prepared with another version of stage 1 splitter {{name = 'edited-rule'}} "
                              f"(its source changed (sha256 ")
    assert message.endswith(f"delete {first} and re-prepare with: unetlm prepare RECIPE --out {first}")

    module = sys.modules["edited_rule"]
    key = cache_key(recipe)
    module.RuleSplitter.version = 2  # a change the source does not show, declared by its author
    assert cache_key(recipe) != key


def test_cache_list_and_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNETLM_CACHE", str(tmp_path / "cache"))
    keys = []
    for max_bytes in (30000, 40000):
        recipe = load_recipe(ROOT / "recipes" / "tiny" / "au2.toml", [f"data.max_bytes={max_bytes}"])
        open_corpora(recipe, progress=False)
        keys.append(cache_key(recipe))
    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    for key in keys:
        assert any(line.startswith(key) and "complete" in line and "regex" in line and "pydocs" in line
                   for line in listing.splitlines()), listing
    assert listing.strip().endswith("MB") and "2 preparations" in listing
    assert main(["cache", "clear", keys[0][:8]]) == 0
    assert capsys.readouterr().out.startswith("removed 1 prepared-data folders")
    assert sorted(p.name for p in (tmp_path / "cache" / "prepared").iterdir()) == [keys[1], f"{keys[1]}.lock"]
    with cache_lock(tmp_path / "cache" / "prepared" / keys[1]):  # another process is preparing it
        assert main(["cache", "clear", keys[1]]) == 1
        assert "is being prepared (host " in capsys.readouterr().err
    assert main(["cache", "clear", "nothing-like-it"]) == 2
    assert capsys.readouterr().err.strip() == (f"unetlm: error: no cached preparation in {tmp_path / 'cache' / 'prepared'} "
                                               f"match 'nothing-like-it'; unetlm cache list shows them")
    assert main(["cache", "clear"]) == 0 and not list((tmp_path / "cache" / "prepared").iterdir())  # locks too
