"""Recipes: strict errors that name the key path, ``--set`` overrides, dump/load round trips,
and every recipe file under ``recipes/`` loading and building (paper scale on the meta device).
"""
from __future__ import annotations

import copy
import types
import typing

import attrs
import pytest
import torch

from strategies import (
    RECIPES, ROOT, TINY_RECIPES, case_id, component_cases, load_runnable, recipe_params, two_stage_dict,
    working_dims,
)
from unetlm.api import build_model
from unetlm.model.summary import summarize
from unetlm.core.tokens import encode
from unetlm.plugins import registry
from unetlm.recipe import RecipeError, dump_recipe, load_recipe, recipe_from_dict
from unetlm.registry import KINDS

AU2 = ROOT / "recipes" / "tiny" / "au2.toml"
COMPONENTS = [pytest.param(kind, name, options, id=f"{kind}:{case_id(name, options)}")
              for kind in KINDS for name, options in component_cases(kind)]


def base() -> dict:
    """A small valid recipe dict (stage 1: regex word splitter, select, linear, attention)."""
    return two_stage_dict("pooler", "select", {}, (16, 32))


def where(kind: str) -> str:
    """The path of the component under test in :func:`two_stage_dict` (a mixer: stage 0 first)."""
    return "model.stages[0].mixer" if kind == "mixer" else f"model.stages[1].{kind}"


def error_of(data: dict, overrides: list[str] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data, overrides)
    return str(info.value)


# ----------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("override, path, suggestion", [
    ("trainig.steps=3", "trainig", "training"),
    ("training.setps=3", "training.setps", "steps"),
    ("model.seqlen=3", "model.seqlen", "seq_len"),
    ("model.stages[0].dimm=3", "model.stages[0].dimm", "dim"),
    ("model.stages[1].max_length=3", "model.stages[1].max_length", "max_len"),
    ("model.stages[1].mixer.head_dimm=3", "model.stages[1].mixer.head_dimm", "head_dim"),
    ("model.stages[1].splitter.presett=3", "model.stages[1].splitter.presett", "preset"),
])
def test_unknown_key_names_its_path_and_suggests(override, path, suggestion):
    message = error_of(base(), [override])
    assert message.startswith(f"{path}: unknown key"), message
    assert f"did you mean {suggestion!r}" in message, message


@pytest.mark.parametrize("kind, name, options", COMPONENTS)
def test_unknown_component_option_names_its_path(kind, name, options):
    dims = working_dims(kind, name, options)
    data = two_stage_dict(kind, name, {**options, "no_such_option": 1}, dims)
    message = error_of(data)
    assert message.startswith(f"{where(kind)}.no_such_option: unknown key"), message
    for field in attrs.fields(registry().get(kind, name).Config):
        misspelt = field.name + "x"
        message = error_of(two_stage_dict(kind, name, {**options, misspelt: 1}, dims))
        assert message.startswith(f"{where(kind)}.{misspelt}: unknown key"), message
        assert repr(field.name) in message, message


# ----------------------------------------------------------------- wrong types


@pytest.mark.parametrize("override, path, expected", [
    ('model.tie_embeddings="false"', "model.tie_embeddings", "true or false"),
    ("model.tie_embeddings=1", "model.tie_embeddings", "true or false"),
    ('training.steps="200"', "training.steps", "an integer"),
    ("training.steps=true", "training.steps", "an integer"),
    ("training.steps=2.0", "training.steps", "an integer"),
    ("model.stages[0].dim=32.0", "model.stages[0].dim", "an integer"),
    ("model.stages[1].layers=false", "model.stages[1].layers", "an integer"),
    ('model.init_std="0.1"', "model.init_std", "a number"),
    ("model.init_std=true", "model.init_std", "a number"),
    ("name=3", "name", "a string"),
    ("model.stages=3", "model.stages", "a list"),
    ("model.stages[1].mixer=3", "model.stages[1].mixer", "a table"),
])
def test_wrong_type_names_path_value_and_expectation(override, path, expected):
    message = error_of(base(), [override])
    assert message.startswith(f"{path} = "), message
    assert "is invalid" in message and expected in message, message


@pytest.mark.parametrize("override, path", [
    ("model.stages[0].dim=0", "model.stages[0].dim"),
    ("model.stages[0].layers=-1", "model.stages[0].layers"),
    ("training.lr=-1.0", "training.lr"),
    ("training.warmup_fraction=1.5", "training.warmup_fraction"),
])
def test_out_of_range_value_names_its_path(override, path):
    message = error_of(base(), [override])
    assert message.startswith(f"{path} = "), message


def _bare_scalar(tp):
    """int, float or bool when the annotation is one of them (or one of them or None)."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
    return args[0] if len(args) == 1 and args[0] in (int, float, bool) else None


@pytest.mark.parametrize("kind, name, options", COMPONENTS)
def test_component_options_are_typed_strictly(kind, name, options):
    """Every int, float or bool option refuses a string; numbers refuse a bool, bools a number."""
    cls = registry().get(kind, name)
    hints = typing.get_type_hints(cls.Config)
    dims = working_dims(kind, name, options)
    checked = 0
    for field in attrs.fields(cls.Config):
        tp = _bare_scalar(hints[field.name])
        if tp is None:
            continue
        wrong = ["1", "true"] + ([True] if tp in (int, float) else []) + ([1] if tp is bool else [])
        for value in wrong:
            message = error_of(two_stage_dict(kind, name, {**options, field.name: value}, dims))
            assert message.startswith(f"{where(kind)}.{field.name} = {value!r} is invalid"), message
            checked += 1
    if not checked:
        pytest.skip(f"{kind} {name} has no int, float or bool options")


# ----------------------------------------------------------------- component names


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_component_name_suggests_the_closest(kind):
    for name in registry().names(kind):
        data = base()
        stage = data["model"]["stages"][1]
        stage[kind] = {"name": name + "x"}
        message = error_of(data)
        assert message.startswith(f"model.stages[1].{kind}.name = {name + 'x'!r} is invalid"), message
        assert "did you mean" in message and repr(name) in message, message


def test_component_table_needs_a_name():
    data = base()
    data["model"]["stages"][1]["pooler"] = {}
    assert error_of(data).startswith("model.stages[1].pooler.name: required key is missing")


# ----------------------------------------------------------------- impossible shapes


@pytest.mark.parametrize("override, path, words", [
    ('model.stages[1].upsampler={name="repeat"}', "model.stages[1].upsampler", "must equal"),
    ("model.stages[1].mixer.head_dim=12", "model.stages[1].mixer.head_dim", "divide"),
    ("model.stages[1].mixer.head_dim=7", "model.stages[1].mixer.head_dim", ""),
    ("model.stages[1].max_len=65", "model.stages[1].max_len", "stage before"),
    ("model.stages[0].max_len=32", "model.stages[0].max_len", "seq_len"),
    ('model.stages[0].splitter={name="regex", preset="word"}', "model.stages[0].splitter", "stage 0"),
    ("model.stages[1].decoder_layers=1", "model.stages[1].decoder_layers", "deepest"),
    ("model.stages=[]", "model.stages", "at least one"),
])
def test_impossible_shape_is_refused_with_its_path(override, path, words):
    message = error_of(base(), [override])
    assert message.startswith(path), message
    assert words in message, message


@pytest.mark.parametrize("key", ["splitter", "pooler", "upsampler", "max_len"])
def test_coarse_stage_needs_its_parts(key):
    data = base()
    del data["model"]["stages"][1][key]
    assert error_of(data).startswith(f"model.stages[1].{key}: required")


def test_repeat_upsampler_works_with_equal_dims():
    recipe = recipe_from_dict(base(), ["model.stages[1].dim=16", 'model.stages[1].upsampler={name="repeat"}'])
    assert recipe.model.stages[1].upsampler.name == "repeat"


# ----------------------------------------------------------------- --set overrides


def test_override_nested_scalar():
    recipe = recipe_from_dict(base(), ["training.lr=1e-3", "training.steps=7", "model.tie_embeddings=true"])
    assert recipe.training.lr == 1e-3 and recipe.training.steps == 7 and recipe.model.tie_embeddings is True


@pytest.mark.parametrize("key", ["model.stages[1].dim", "model.stages.1.dim"])
def test_override_list_index_both_spellings(key):
    assert recipe_from_dict(base(), [f"{key}=48"]).model.stages[1].dim == 48


def test_override_component_option_and_whole_component():
    recipe = recipe_from_dict(base(), [
        "model.stages[1].splitter.preset=word2",  # a bare string
        'model.stages[1].pooler={name="mean"}',
        "model.stages.0.mixer.window=5",
    ])
    stage = recipe.model.stages[1]
    assert stage.splitter.config.preset == "word2"
    assert stage.pooler.name == "mean"
    assert recipe.model.stages[0].mixer.config.window == 5


def test_override_bare_and_quoted_strings():
    recipe = recipe_from_dict(base(), ["training.device=cpu", 'name="two words"', "description=plain words here"])
    assert recipe.training.device == "cpu"
    assert recipe.name == "two words"
    assert recipe.description == "plain words here"


def test_override_creates_missing_tables_and_lists():
    data = base()
    data.pop("training", None)
    recipe = recipe_from_dict(data, ["training.steps=5", 'data.source="files"', 'data.paths=["a.txt", "b.txt"]'])
    assert recipe.training.steps == 5 and recipe.data.paths == ["a.txt", "b.txt"]


def test_overrides_apply_in_order_and_leave_the_input_alone():
    data = base()
    before = copy.deepcopy(data)
    recipe = recipe_from_dict(data, ["training.steps=5", "training.steps=6"])
    assert recipe.training.steps == 6 and data == before


@pytest.mark.parametrize("override, words", [
    ("model.stages[5].dim=3", "does not exist"),
    ("model.stages.5.dim=3", "does not exist"),
    ("model.seq_len.x=1", "model.seq_len is not a table"),
    ("training", "expected key=value"),
    ("model..dim=3", "cannot read the key path"),
    ("=3", "cannot read the key path"),
    ("training.steps=abc", "training.steps = 'abc' is invalid"),
])
def test_bad_override_is_explained(override, words):
    assert words in error_of(base(), [override])


def test_load_recipe_applies_overrides_and_names_the_recipe():
    recipe = load_recipe(AU2, ["training.steps=3", "model.stages[1].splitter.preset=word4"])
    assert recipe.name == "au2" and recipe.training.steps == 3
    assert recipe.model.stages[1].splitter.config.preset == "word4"


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nseq_len = 3\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(bad)


# ----------------------------------------------------------------- round trips


def _round_trip(recipe, tmp_path):
    path = tmp_path / "dumped.toml"
    path.write_text(dump_recipe(recipe))
    again = load_recipe(path)
    assert again == recipe
    assert dump_recipe(again) == dump_recipe(recipe)


@pytest.mark.parametrize("path", recipe_params(RECIPES))
def test_recipe_file_round_trips(path, tmp_path):
    _round_trip(load_recipe(path), tmp_path)


@pytest.mark.parametrize("kind, name, options", COMPONENTS)
def test_component_config_round_trips(kind, name, options, tmp_path):
    dims = working_dims(kind, name, options)
    _round_trip(recipe_from_dict(two_stage_dict(kind, name, options, dims)), tmp_path)


# ----------------------------------------------------------------- every recipe file


@pytest.mark.parametrize("path", recipe_params(RECIPES))
def test_recipe_file_loads_and_builds_on_the_meta_device(path):
    recipe = load_runnable(path)
    with torch.device("meta"):
        model = build_model(recipe)
    summary = summarize(model)
    assert summary.params == sum(p.numel() for p in model.parameters()) > 0
    assert sum(stage.params for stage in summary.stages) == summary.params
    if recipe.model.tokenizer is None:
        assert summary.bytes_per_token == 1.0 and summary.train_flops_per_byte == summary.train_flops_per_token > 0
    else:  # per byte needs the trained tokenizer's bytes per token
        assert summary.bytes_per_token is None and summary.train_flops_per_token > 0
        with pytest.raises(ValueError, match="trained tokenizer"):
            summary.train_flops_per_byte
    assert [s.dim for s in summary.stages] == [s.dim for s in recipe.model.stages]


@pytest.mark.parametrize("path", recipe_params(TINY_RECIPES))
def test_tiny_recipe_builds_and_runs(path):
    torch.manual_seed(0)
    model = build_model(load_runnable(path)).eval()
    assert sum(p.numel() for p in model.parameters()) < 20_000_000, "a tiny recipe must train on a CPU"
    tokens = encode(b"Hello, world. A tiny recipe runs.\n").unsqueeze(0)
    with torch.no_grad():
        out = model(tokens, targets=torch.roll(tokens, -1, 1))
    assert out.logits.shape == (1, tokens.shape[1], model.spec.vocab_size)
    assert out.logits.isfinite().all() and out.loss.isfinite()


# ---------------------------------------------------------------- the key reference in docs/recipes.md


def _documented_sections() -> dict[str, dict[str, str]]:
    """Heading -> {key: default cell} of every table under "## Every recipe key"."""
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    reference = text.split("\n## Every recipe key\n", 1)[1].split("\n## ", 1)[0]
    sections: dict[str, dict[str, str]] = {}
    heading = None
    for line in reference.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            sections[heading] = {}
        elif heading and line.startswith("| `"):
            key, default = (cell.strip() for cell in line.strip("|").split("|")[:2])
            sections[heading][key.strip("`")] = default
    return sections


def _default_matches(cell: str, field) -> bool:
    import tomllib

    default = field.default
    if default is attrs.NOTHING:
        return cell == "required"
    if isinstance(default, attrs.Factory):
        default = default.factory()
        if attrs.has(type(default)):
            return cell == "table"
    if default is None:
        return cell == "—"
    return tomllib.loads(f"v = {cell.strip('`')}")["v"] == default


def test_every_recipe_key_is_documented_with_its_default():
    from unetlm.recipe.schema import (
        DataSpec, EmbeddingSpec, ModelSpec, Recipe, StageSpec, TokenizerSpec, TrainingSpec, WandbSpec,
    )

    classes = {
        "Top level": (Recipe, {"model", "data", "training"}), "`[model]`": (ModelSpec, set()),
        "`[[model.stages]]`": (StageSpec, set()), "`[model.embedding]`": (EmbeddingSpec, set()),
        "`[model.tokenizer]`": (TokenizerSpec, set()), "`[data]`": (DataSpec, set()),
        "`[training]`": (TrainingSpec, set()), "`[training.wandb]`": (WandbSpec, set()),
    }
    for kind in KINDS:
        for entry in registry().entries(kind):
            if entry.origin == "built-in":
                classes[f"{kind} `{entry.name}`"] = (entry.load().Config, set())
    sections = _documented_sections()
    for heading, section in list(sections.items()):  # "pooler `select`, pooler `mean`": one section, two names
        for part in heading.split(", ")[1:] if ", " in heading else []:
            sections[part] = section
        if ", " in heading:
            sections[heading.split(", ")[0]] = section
    for heading, (cls, tables) in classes.items():
        assert heading in sections, f"docs/recipes.md has no section {heading!r}"
        documented = sections[heading]
        fields = {f.name: f for f in attrs.fields(cls) if f.name not in tables}
        assert set(documented) == set(fields), f"{heading}: documented {sorted(documented)}, options {sorted(fields)}"
        for name, field in fields.items():
            assert _default_matches(documented[name], field), f"{heading}.{name}: documented default {documented[name]}"
