"""The plugin contract: entry-point discovery, failure reporting, lazy loading, and the
``unetlm-sentence`` example plugin end to end (registered, split, built and trained).

Third-party plugins are simulated by writing a ``*.dist-info`` (METADATA + entry_points.txt)
and the plugin module into a temporary directory put on ``sys.path``: importlib.metadata
finds them exactly as it finds installed distributions.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from unetlm.plugins import PluginError, build_registry, hookimpl, load_failures, register_plugin, registry
from unetlm.recipe import RecipeError, load_recipe
from unetlm.registry import RegistryError

ROOT = Path(__file__).resolve().parents[1]
SENTENCE_DIR = ROOT / "plugins" / "unetlm-sentence"
SENTENCE_RECIPE = SENTENCE_DIR / "recipes" / "tiny-sentence.toml"


def _sentence_installed() -> bool:
    try:
        importlib.metadata.distribution("unetlm-sentence")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def sentence_plugin():
    """The process-wide registry with the ``sentence`` splitter: from its entry point when the
    package is installed (``pip install -e plugins/unetlm-sentence``), else registered here."""
    if "sentence" not in registry().names("splitter"):
        assert not _sentence_installed(), f"unetlm-sentence is installed but not registered: {load_failures}"
        if importlib.util.find_spec("unetlm_sentence") is None:
            sys.path.insert(0, str(SENTENCE_DIR))
        register_plugin(importlib.import_module("unetlm_sentence.plugin"), "plugin unetlm-sentence")
    return registry()


# ---------------------------------------------------------------- simulated distributions


@pytest.fixture
def site(tmp_path, monkeypatch):
    """``site(dist, entry_points, **modules)`` writes a distribution (metadata and modules) on sys.path."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    added: list[str] = []
    failures = list(load_failures)  # the process-wide registry's, restored afterwards

    def install(dist: str, entry_points: dict[str, str], **modules: str) -> Path:
        for name, source in modules.items():
            (root / f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
            added.append(name)
        info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n", encoding="utf-8")
        lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[unetlm]\n{lines}", encoding="utf-8")
        importlib.invalidate_caches()
        return root

    yield install
    for name in added:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    load_failures[:] = failures


def plugin_source(*registrations: tuple[str, str, str], hook: str = "unetlm_register", args: str = "registry") -> str:
    body = "".join(f"    {args}.add({k!r}, {n!r}, {t!r}, 'test component')\n" for k, n, t in registrations)
    return f"from unetlm.plugins import hookimpl\n\n\n@hookimpl\ndef {hook}({args}):\n" + (body or "    pass\n")


WINDOW = "unetlm.splitters.fixed_window:FixedWindowSplitter"
SELECT = "unetlm.poolers.select:SelectPooler"


# ---------------------------------------------------------------- discovery and registration


def test_builtins_register_through_the_entry_point_group():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["unetlm"]
    assert declared == {"builtins": "unetlm.builtins"}
    reg = build_registry()
    assert {"regex", "fixed-window"} <= set(reg.names("splitter"))
    assert {e.origin for kind in ("splitter", "pooler", "upsampler", "mixer") for e in reg.entries(kind)
            if e.target.startswith("unetlm.")} == {"built-in"}


def test_third_party_plugin_is_discovered_and_loads(site):
    site("every-third", {"every_third": "plugtest_good"},
         plugtest_good=plugin_source(("splitter", "every-third", WINDOW)))
    reg = build_registry()
    entry = reg.entry("splitter", "every-third")
    assert entry.origin == "plugin every-third" and entry.target == WINDOW
    assert reg.get("splitter", "every-third").__name__ == "FixedWindowSplitter"
    assert load_failures == []


def test_plugin_that_raises_on_import_is_reported_by_name_and_others_load(site):
    site("broken-plugin", {"broken": "plugtest_broken"}, plugtest_broken="raise RuntimeError('kaboom')\n")
    site("fine-plugin", {"fine": "plugtest_fine"}, plugtest_fine=plugin_source(("pooler", "fine-pool", SELECT)))
    reg = build_registry()
    assert len(load_failures) == 1
    assert "plugin broken-plugin" in load_failures[0] and "kaboom" in load_failures[0]
    assert "fine-pool" in reg.names("pooler") and "regex" in reg.names("splitter")


def test_plugin_whose_hook_raises_is_reported_and_leaves_no_entries(site):
    source = plugin_source(("splitter", "half-done", WINDOW)) + "    raise KeyError('oops')\n"
    site("half-plugin", {"half": "plugtest_half"}, plugtest_half=source)
    reg = build_registry()
    assert "half-done" not in reg.names("splitter")
    assert len(load_failures) == 1 and "plugin half-plugin" in load_failures[0] and "oops" in load_failures[0]


def test_broken_plugin_does_not_take_the_cli_down(site):
    root = site("broken-plugin", {"broken": "plugtest_cli_broken"}, plugtest_cli_broken="import no_such_module_xyz\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "unetlm.cli", "list"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "regex" in done.stdout and "attention" in done.stdout
    assert "plugin broken-plugin" in done.stderr and "no_such_module_xyz" in done.stderr
    assert "(not loaded) plugin broken-plugin" in done.stdout


def _not_loaded(pattern: str):
    """Build the registry; the one plugin that breaks the contract is skipped with ``pattern``
    in its message, and the built-ins still load."""
    reg = build_registry()
    assert len(load_failures) == 1 and re.search(pattern, load_failures[0]), load_failures
    assert "regex" in reg.names("splitter")
    return reg


def test_misspelled_hook_is_an_error_naming_the_plugin(site):
    site("typo-plugin", {"typo": "plugtest_typo"},
         plugtest_typo=plugin_source(("splitter", "typo", WINDOW), hook="unetlm_registr"))
    reg = _not_loaded(r"plugin typo-plugin .*'unetlm_registr'.*did you mean 'unetlm_register'")
    with pytest.raises(RegistryError, match=r"unknown splitter 'typo'.*failed to load: plugin typo-plugin"):
        reg.get("splitter", "typo")


def test_hook_arguments_outside_the_spec_are_an_error_naming_the_plugin(site):
    site("args-plugin", {"args": "plugtest_args"}, plugtest_args=plugin_source(("splitter", "x", WINDOW), args="reg"))
    _not_loaded(r"plugin args-plugin has an invalid hook.*reg")


def test_unmarked_hook_is_an_error_naming_the_plugin(site):
    source = "def unetlm_register(registry):\n    registry.add('splitter', 'x', 'a:B', 'unmarked')\n"
    site("unmarked-plugin", {"unmarked": "plugtest_unmarked"}, plugtest_unmarked=source)
    _not_loaded(r"plugin unmarked-plugin implements no hook.*hookimpl")


def test_two_plugins_claiming_one_name_is_an_error_naming_both(site):
    site("dup-a", {"a": "plugtest_dup_a"}, plugtest_dup_a=plugin_source(("mixer", "twin", WINDOW)))
    site("dup-b", {"b": "plugtest_dup_b"}, plugtest_dup_b=plugin_source(("mixer", "twin", WINDOW)))
    reg = _not_loaded(r"mixer 'twin' is registered twice: by plugin dup-a .* by plugin dup-b")
    with pytest.raises(RegistryError, match=r"mixer 'twin' is registered twice: by plugin dup-a .* by plugin dup-b"):
        reg.get("mixer", "twin")  # neither is picked silently


def test_list_shows_what_recipes_get_for_a_name_claimed_twice(site, monkeypatch, capsys):
    import unetlm.plugins
    from unetlm.cli import main

    site("dup-a", {"a": "plugtest_list_a"}, plugtest_list_a=plugin_source(("mixer", "twin", WINDOW)))
    site("dup-b", {"b": "plugtest_list_b"}, plugtest_list_b=plugin_source(("mixer", "twin", WINDOW)))
    site("shadow", {"shadow": "plugtest_list_shadow"}, plugtest_list_shadow=plugin_source(("splitter", "regex", WINDOW)))
    monkeypatch.setattr(unetlm.plugins, "_registry", build_registry())
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert "unusable: mixer 'twin' is registered twice: by plugin dup-a" in shown["twin"], shown["twin"]
    assert "unusable: splitter 'regex' is registered twice: by built-in" in shown["regex"], shown["regex"]
    assert "[plugin dup-a]" not in shown["twin"] and "[built-in]" in shown["space"]
    assert any(line.startswith("(not loaded) mixer 'twin' is registered twice") for line in lines)


def test_plugin_cannot_take_a_builtin_name(site):
    site("shadow", {"shadow": "plugtest_shadow"}, plugtest_shadow=plugin_source(("splitter", "regex", WINDOW)))
    reg = build_registry()
    with pytest.raises(RegistryError, match=r"splitter 'regex' is registered twice: by built-in .* by plugin shadow"):
        reg.get("splitter", "regex")
    assert reg.get("pooler", "select").__name__ == "SelectPooler"  # what the plugin does not touch still loads


@pytest.mark.parametrize(
    "registration, message",
    [
        (("tokenizer", "bpe", WINDOW), r"plugin bad-plugin registers 'bpe' as unknown kind 'tokenizer'"),
        (("splitter", "no colon", WINDOW), r"a name is a non-empty string without spaces"),
        (("splitter", "flat", "unetlm.splitters.fixed_window"), r"must look like 'module:Class'"),
    ],
)
def test_malformed_registration_is_an_error_naming_the_plugin(site, registration, message):
    site("bad-plugin", {"bad": "plugtest_bad"}, plugtest_bad=plugin_source(registration))
    _not_loaded(message)


def test_broken_plugin_is_reported_as_its_own_error_and_other_recipes_load(site, monkeypatch):
    """A contract error is the plugin's, never pinned on an unrelated recipe key."""
    from unetlm import plugins

    site("typo-plugin", {"typo": "plugtest_typo2"},
         plugtest_typo2=plugin_source(("splitter", "typo", WINDOW), hook="unetlm_registr"))
    monkeypatch.setattr(plugins, "_registry", None)  # the process-wide registry, rebuilt with the plugin
    monkeypatch.setattr(plugins, "_manager", None)
    load_recipe(ROOT / "recipes" / "tiny" / "au2.toml")
    with pytest.raises(RecipeError, match=r"stages\[1\]\.splitter\.name = 'typo' is invalid: .*plugin typo-plugin "
                                          r"implements unknown hook"):
        load_recipe(ROOT / "recipes" / "tiny" / "au2.toml", ["model.stages[1].splitter={name='typo'}"])


@pytest.mark.parametrize(
    "target, message",
    [
        ("plugtest_missing_module:Thing", r"cannot be imported"),
        ("unetlm.splitters.fixed_window:NoSuchClass", r"cannot be imported"),
        (SELECT, r"is not a subclass of unetlm\.splitters\.base\.Splitter"),
    ],
)
def test_bad_target_fails_on_use_naming_the_plugin(site, target, message):
    site("target-plugin", {"t": "plugtest_target"}, plugtest_target=plugin_source(("splitter", "odd", target)))
    reg = build_registry()  # targets are not imported while the registry is built
    with pytest.raises(RegistryError, match=rf"splitter 'odd' from plugin target-plugin.*{message}"):
        reg.get("splitter", "odd")


def test_unknown_name_and_kind_messages():
    reg = build_registry()
    with pytest.raises(RegistryError, match=r"unknown splitter 'regx'; did you mean 'regex'"):
        reg.entry("splitter", "regx")
    with pytest.raises(RegistryError, match=r"unknown component kind 'splitters'"):
        reg.names("splitters")


class RunTimePlugin:
    """A plugin object (not a module) registering one upsampler."""

    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def unetlm_register(self, registry):
        registry.add("upsampler", self.name, "unetlm.upsamplers.linear:LinearUpsampler", "registered at run time")


def test_register_plugin_at_run_time_is_idempotent(monkeypatch):
    from unetlm import plugins

    monkeypatch.setattr(plugins, "_registry", None)  # a fresh process-wide registry for this test
    monkeypatch.setattr(plugins, "_manager", None)
    plugin = RunTimePlugin("runtime-up")
    register_plugin(plugin, "plugin runtime")
    register_plugin(plugin, "plugin runtime")  # the same object again: no duplicate-name error
    assert registry().entry("upsampler", "runtime-up").origin == "plugin runtime"
    with pytest.raises(PluginError, match=r"registered twice: by plugin runtime .* by plugin other"):
        register_plugin(RunTimePlugin("runtime-up"), "plugin other")
    assert registry().entry("upsampler", "runtime-up").origin == "plugin runtime"


# ---------------------------------------------------------------- laziness: no torch, no targets


LAZY_SCRIPT = """
import importlib, json, sys
import unetlm.cli
from unetlm.plugins import registry, register_plugin
try:
    unetlm.cli.main(["--help"])
except SystemExit:
    pass
reg = registry()
if "sentence" not in reg.names("splitter"):
    sys.path.insert(0, sys.argv[1])
    register_plugin(importlib.import_module("unetlm_sentence.plugin"), "plugin unetlm-sentence")
unetlm.cli.main(["list"])
targets = sorted({e.target.partition(":")[0] for k in ("splitter", "pooler", "upsampler", "mixer")
                  for e in reg.entries(k)})
imported = sorted(m for m in ("torch", "numpy", *targets) if m in sys.modules)
print("RESULT", json.dumps({"imported": imported, "targets": targets, "splitters": reg.names("splitter")}))
"""


def test_registry_and_cli_import_neither_torch_nor_component_modules():
    done = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, str(SENTENCE_DIR)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["imported"] == []
    assert {"unetlm.splitters.regex", "unetlm.mixers.attention", "unetlm_sentence.splitter"} <= set(result["targets"])
    assert {"regex", "fixed-window", "sentence"} <= set(result["splitters"])
    assert "sentence" in done.stdout and "unetlm-sentence" in done.stdout  # listed by `unetlm list`


# ---------------------------------------------------------------- the unetlm-sentence plugin


def test_sentence_plugin_arrives_through_its_declared_entry_point(site):
    project = tomllib.loads((SENTENCE_DIR / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"]["unetlm"]
    assert declared == {"sentence": "unetlm_sentence.plugin"}
    if not _sentence_installed():  # the same metadata pip would write
        root = site(project["name"], declared)
        (root / "unetlm_sentence").symlink_to(SENTENCE_DIR / "unetlm_sentence")
        importlib.invalidate_caches()
    before = "unetlm_sentence.splitter" in sys.modules
    reg = build_registry()
    entry = reg.entry("splitter", "sentence")
    assert entry.origin == "plugin unetlm-sentence"
    assert entry.target == "unetlm_sentence.splitter:SentenceSplitter"
    assert ("unetlm_sentence.splitter" in sys.modules) == before  # building did not import the target
    from unetlm.splitters.base import Splitter

    assert issubclass(reg.get("splitter", "sentence"), Splitter)


def _sentence_marks(data: bytes, parent: np.ndarray | None = None, **options) -> list[str]:
    from unetlm.recipe.structure import structure

    cls = registry().get("splitter", "sentence")
    splitter = cls(structure(cls.Config, options, "splitter"))
    mask = splitter.boundaries(data, np.ones(len(data), bool) if parent is None else parent)
    return [data[: i + 1].decode("utf-8") for i in np.flatnonzero(mask)]


def test_sentence_boundaries(sentence_plugin):
    text = b'One. Two! "Three?" Four (five.) six\n\nSeven\n\n\nEight.\n\nNine'
    assert _sentence_marks(text) == [
        "One. ", 'One. Two! ', 'One. Two! "Three?" ', 'One. Two! "Three?" Four (five.) ',
        'One. Two! "Three?" Four (five.) six\n\n',
        'One. Two! "Three?" Four (five.) six\n\nSeven\n\n',
        'One. Two! "Three?" Four (five.) six\n\nSeven\n\n\nEight.\n',  # one boundary per whitespace run
    ]
    assert _sentence_marks(b"a. b\n\nc", paragraphs=False) == ["a. "]
    assert _sentence_marks(b"a! b.", terminators=".") == []  # no whitespace after the last one
    quoted = "He said \u201cStop.\u201d Then wait\u2026 x".encode()
    assert _sentence_marks(quoted, terminators=".\u2026", closers="\u201d") == [
        "He said \u201cStop.\u201d ", "He said \u201cStop.\u201d Then wait\u2026 ",
    ]


def test_sentence_boundary_moves_to_the_next_parent_position(sentence_plugin):
    data = b"Hi. there you"
    parent = np.zeros(len(data), bool)
    parent[[1, 8, 12]] = True  # no parent position at the space after "Hi."
    assert _sentence_marks(data, parent) == ["Hi. there"]


def test_sentence_boundaries_sit_on_word_boundaries(sentence_plugin):
    from unetlm.splitters.splitting import split_document
    from unetlm.recipe.structure import structure

    data = b'Words here. "Quoted!" (Aside.) Done?\n\nNew paragraph\n\nend'
    reg = registry()
    word = reg.get("splitter", "regex")(structure(reg.get("splitter", "regex").Config, {"preset": "word"}, ""))
    sentence = reg.get("splitter", "sentence")(structure(reg.get("splitter", "sentence").Config, {}, ""))
    words, sentences = split_document([word, sentence], data)
    assert np.array_equal(sentences, sentence.boundaries(data, np.ones(len(data), bool)))  # nothing lost
    assert np.flatnonzero(sentences).tolist() == [11, 21, 30, 36, 52]
    assert not (sentences & ~words).any()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.stages[2].splitter.terminators=''", r"model\.stages\[2\]\.splitter: terminators = '' is invalid"),
        ("model.stages[2].splitter.closers=' )'", r"closers = ' \)' is invalid: whitespace"),
        ("model.stages[2].splitter.paragraph=false",
         r"model\.stages\[2\]\.splitter\.paragraph: unknown key; did you mean 'paragraphs'"),
    ],
)
def test_sentence_options_are_checked_strictly(sentence_plugin, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(SENTENCE_RECIPE, [override])


def test_tiny_sentence_recipe_trains(sentence_plugin, tmp_path):
    from unetlm.api import load_checkpoint
    from unetlm.train.loop import train

    overrides = [
        "model.seq_len=128", "model.stages[1].max_len=48", "model.stages[2].max_len=8",
        "training.steps=8", "training.batch_size=4", "training.eval_every=8", "training.eval_batches=1",
        "training.warmup_fraction=0.25", "training.sample_bytes=0",
    ]
    recipe = load_recipe(SENTENCE_RECIPE, overrides)
    assert [s.splitter.name for s in recipe.model.stages[1:]] == ["regex", "sentence"]
    final = train(recipe, tmp_path, progress=False, sample=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and final["step"] == 8
    assert losses[-1] < losses[0] - 0.2, losses
    assert np.isfinite(final["val_loss"])
    model, again = load_checkpoint(tmp_path)
    assert again.model.stages[2].splitter.name == "sentence"
    assert type(model.splitters[1]).__name__ == "SentenceSplitter"


def test_cached_generation_matches_recompute_with_the_sentence_splitter(sentence_plugin):
    import torch

    from unetlm.api import build_model
    from unetlm.model.generate import generate

    overrides = ["model.seq_len=64", "model.stages[1].max_len=32", "model.stages[2].max_len=8", "model.init_std=0.3"]
    torch.manual_seed(0)
    model = build_model(load_recipe(SENTENCE_RECIPE, overrides)).double().eval()
    prompts = [b'One. "Two!" Three\n\nFour ', b"Hi. "]
    cached = generate(model, prompts, 4, temperature=0, cached=True)
    recomputed = generate(model, prompts, 4, temperature=0, cached=False)
    assert list(cached) == list(recomputed) and [len(t) for t in cached] == [4, 4]
    assert cached.firing_rates[2] > 0  # the sentence stage ran on the prompts' boundaries


def test_loading_components_has_no_side_effects(tmp_path, monkeypatch):
    """Importing every registered component and reading its examples writes nothing (the
    entropy splitter's example checkpoint is built by the tests, not by the component)."""
    import tempfile

    from unetlm.registry import KINDS

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    reg = build_registry()
    for kind in KINDS:
        for entry in reg.entries(kind):
            assert entry.load().examples
    written = [p.name for p in tmp_path.iterdir() if not p.name.startswith("torchinductor")]  # torch's own cache
    assert written == []
