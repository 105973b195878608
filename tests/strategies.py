"""Shared hypothesis strategies and tiny-model builders for the registry-wide tests.

Everything registered is picked up here: ``component_cases(kind)`` lists every registered
component of a kind with every option table of its ``examples``, so a newly registered
component is covered by the tests without touching them.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from entropy_example import with_example_checkpoint, with_example_options
from unetlm.plugins import registry
from unetlm.recipe import RecipeError, load_recipe, recipe_from_dict
from unetlm.recipe.structure import structure

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "recipes" / "sweeps").glob("*.toml"))  # sweep files (tests/test_sweep.py), not recipes
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.toml") if p not in SWEEPS)
TINY_RECIPES = sorted((ROOT / "recipes" / "tiny").glob("*.toml"))


# ---------------------------------------------------------------- registry-wide cases


def component_cases(kind: str) -> list[tuple[str, dict]]:
    """(name, options) for every registered component of ``kind`` and every example table
    (an entropy splitter's checkpoint: the example model of :mod:`entropy_example`)."""
    cases = []
    for entry in registry().entries(kind):
        for options in entry.load().examples:
            if kind == "splitter" and entry.name == "entropy":
                options = with_example_options(options)
            cases.append((entry.name, dict(options)))
    return cases


def case_id(name: str, options: dict) -> str:
    """A readable test id such as ``regex(preset=word)`` (long values cut to their end)."""

    def short(v):
        text = str(v)
        return text if len(text) <= 20 else "..." + text[-12:]

    shown = ",".join(f"{k}={short(v)}" for k, v in sorted(options.items()))
    return f"{name}({shown})"


def byte_splitter_cases() -> list[tuple[str, dict]]:
    """``component_cases("splitter")`` without learned splitters (they decide from hidden
    states inside the model and have no byte-level ``boundaries``)."""
    return [c for c in component_cases("splitter") if not getattr(registry().get("splitter", c[0]), "learned", False)]


def make_splitter(name: str, options: dict):
    cls = registry().get("splitter", name)
    return cls(structure(cls.Config, options, f"splitter {name}"))


def recipe_params(paths: list[Path]) -> list:
    return [pytest.param(p, id=str(p.relative_to(ROOT / "recipes"))) for p in paths]


# ---------------------------------------------------------------- byte strategies

# Chunks that make word, number and whitespace boundaries interact: runs of spaces, tabs and
# newlines next to punctuation, digits and letters (the inputs where lookahead splitters fail).
RICH_CHUNKS = [
    b" ", b" ", b" ", b"  ", b"\t", b"\n", b"\n", b"\r\n", b"\x0b", b"\x0c",
    b".", b",", b"!", b"?", b"'", b"\"", b"-", b"(", b")", b":", b"...",
    b"0", b"7", b"42", b"2024",
    b"a", b"b", b"Z", b"the", b"word", b"x_1",
    "é".encode(), "中".encode(), "😀".encode(), b"\xff", b"\x00", b"\x80",
]

rich_bytes = st.lists(st.sampled_from(RICH_CHUNKS), max_size=40).map(b"".join)
arbitrary_bytes = st.binary(max_size=64)  # invalid UTF-8 included
unicode_text = st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass"))
no_space_text = st.text(
    alphabet=st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc", "Cs")), max_size=40
).map(lambda s: s.encode("utf-8"))
cjk_text = st.text(
    alphabet=st.one_of(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), st.sampled_from("。，、 \n「」1")),
    max_size=30,
).map(lambda s: s.encode("utf-8"))
emoji_text = st.lists(
    st.sampled_from(["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", " ", "\n", "a", "!"]), max_size=20
).map(lambda parts: "".join(parts).encode("utf-8"))
long_words = st.builds(
    lambda letter, n, tail: letter * n + tail,
    st.sampled_from([b"a", b"x", "é".encode(), b"7"]),
    st.integers(60, 300),
    rich_bytes,
)

documents = st.one_of(
    rich_bytes, rich_bytes, rich_bytes, arbitrary_bytes, unicode_text, no_space_text, cjk_text, emoji_text, long_words
)


@st.composite
def with_parent(draw, data_strategy=documents):
    """(data, parent mask): an arbitrary bool mask of the data's length."""
    data = draw(data_strategy)
    bits = draw(st.lists(st.booleans(), min_size=len(data), max_size=len(data)))
    return data, np.array(bits, dtype=bool)


# ---------------------------------------------------------------- tiny models

DEFAULT_PARTS = {
    "mixer": {"name": "attention", "head_dim": 8},
    "splitter": {"name": "regex", "preset": "word"},
    "pooler": {"name": "select"},
    "upsampler": {"name": "linear"},
}
DIM_CHOICES = [(16, 32), (32, 32), (64, 64)]


def two_stage_dict(
    kind: str, name: str, options: dict, dims: tuple[int, int], seq_len: int = 64,
    max_len: int | None = None, init_std: float = 0.2,
) -> dict:
    """A 2-stage recipe dict with component ``name`` of ``kind`` (mixers: at both stages)."""
    parts = {k: dict(v) for k, v in DEFAULT_PARTS.items()}
    parts[kind] = {"name": name, **options}
    return {
        "name": f"{kind}-{name}",
        "model": {
            "seq_len": seq_len,
            "init_std": init_std,
            "stages": [
                {"dim": dims[0], "layers": 2, "mixer": dict(parts["mixer"])},
                {
                    "dim": dims[1], "layers": 1, "max_len": max_len or seq_len,
                    "mixer": dict(parts["mixer"]), "splitter": parts["splitter"],
                    "pooler": parts["pooler"], "upsampler": parts["upsampler"],
                },
            ],
        },
    }


def working_dims(kind: str, name: str, options: dict, **kw) -> tuple[int, int]:
    """The first of :data:`DIM_CHOICES` that makes a valid 2-stage recipe for this component."""
    errors = []
    for dims in DIM_CHOICES:
        try:
            recipe_from_dict(two_stage_dict(kind, name, options, dims, **kw))
            return dims
        except RecipeError as exc:
            errors.append(f"dims {dims}: {exc}")
    pytest.fail(f"{kind} {case_id(name, options)} builds in none of the tried shapes:\n" + "\n".join(errors))


def two_stage_recipe(kind: str, name: str, options: dict, **kw):
    return recipe_from_dict(two_stage_dict(kind, name, options, working_dims(kind, name, options, **kw), **kw))


@functools.lru_cache(maxsize=None)
def _cached_component_model(kind: str, name: str, options_json: str, max_len: int | None):
    from unetlm.api import build_model

    torch.manual_seed(0)
    recipe = two_stage_recipe(kind, name, json.loads(options_json), max_len=max_len)
    return with_random_starts(build_model(recipe)).double().eval()


def with_random_starts(model, std: float = 0.2):
    """The model with random upsampler start vectors: they start at zero, which would hide any
    leak through what a position before its first boundary receives (e.g. its offset)."""
    with torch.no_grad():
        for upsampler in model.upsamplers:
            upsampler.start.normal_(0.0, std)
    return model


def component_model(kind: str, name: str, options: dict, max_len: int | None = None):
    """A float64 tiny model with the component under test (cached; do not train it)."""
    return _cached_component_model(kind, name, json.dumps(options, sort_keys=True), max_len)


def runnable(recipe):
    """Entropy splitters that name a trained checkpoint get the (untrained) example one."""
    if any(stage.splitter is not None and stage.splitter.name == "entropy" for stage in recipe.model.stages):
        recipe = with_example_checkpoint(recipe)
    return recipe


def load_runnable(path: Path, overrides: list[str] | tuple[str, ...] = ()):
    return runnable(load_recipe(path, overrides))


def shortened(path: Path, seq_len: int) -> list[str]:
    """Overrides that cut a recipe to ``seq_len`` bytes per row (every stage at most that long)."""
    recipe = load_recipe(path)
    overrides = [f"model.seq_len={seq_len}", f"model.stages[0].max_len={seq_len}"]
    for i, stage in enumerate(recipe.model.stages[1:], start=1):
        overrides.append(f"model.stages[{i}].max_len={min(stage.max_len, seq_len)}")
    return overrides


@functools.lru_cache(maxsize=None)
def recipe_model(
    path: Path, seq_len: int | None = 96, std: float | None = 0.2, dtype: torch.dtype = torch.float64,
    extra: tuple[str, ...] = (),
):
    """An eval-mode model of a recipe file (cached; do not train it), rows cut to ``seq_len``
    (None: as written); ``std`` overrides init_std (a large one makes any leak loud)."""
    from unetlm.api import build_model

    torch.manual_seed(0)
    overrides = [] if seq_len is None else shortened(path, seq_len)
    overrides += [] if std is None else [f"model.init_std={std}"]
    model = with_random_starts(build_model(load_runnable(path, [*overrides, *extra]))).to(dtype).eval()
    if model.tokenizer is None:  # a tokenized recipe: a tokenizer learned from a little text
        model.tokenizer = small_tokenizer(model.spec.vocab_size)
    return model


@functools.lru_cache(maxsize=None)
def small_tokenizer(vocab_size: int):
    """A BPE tokenizer learned from the first 150 Python help topics."""
    from unetlm.data.bpe import BpeTokenizer
    from unetlm.data.sources import pydocs_documents

    return BpeTokenizer.train(list(pydocs_documents())[:150], vocab_size)
