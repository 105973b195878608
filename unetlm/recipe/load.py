"""Loading recipes from TOML, applying ``--set key=value`` overrides, and writing them back."""
from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from unetlm.recipe.errors import RecipeError
from unetlm.recipe.schema import Recipe
from unetlm.recipe.structure import structure

_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_key_path(key: str) -> list[str | int]:
    """'model.stages[1].dim' or 'model.stages.1.dim' -> ['model', 'stages', 1, 'dim']."""
    parts: list[str | int] = []
    pos = 0
    for m in _SEGMENT.finditer(key):
        if m.start() != pos and key[pos:m.start()] != ".":
            raise RecipeError(f"--set {key!r}: cannot read the key path")
        pos = m.end()
        word, index = m.group(1), m.group(2)
        parts.append(int(index) if index is not None else (int(word) if word.isdigit() else word))
    if not parts or pos != len(key):
        raise RecipeError(f"--set {key!r}: cannot read the key path")
    return parts


def parse_value(text: str) -> Any:
    """A TOML value (10, 1e-3, true, "text", [1, 2], {name = "x"}); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment!r}: expected key=value, e.g. training.steps=10")
    key, _, raw = assignment.partition("=")
    path = parse_key_path(key.strip())
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        shown = _show(path[: depth + 1])
        nxt = path[depth + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise RecipeError(f"--set {key}: {shown} does not exist (the list has {size} items)")
            node = node[part]
        else:
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {_show(path[:depth])} is not a table")
            if part not in node:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"--set {key}: {_show(path)} does not exist")
    elif not isinstance(node, dict):
        raise RecipeError(f"--set {key}: {_show(path[:-1])} is not a table")
    node[last] = parse_value(raw.strip())


def _show(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def recipe_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    data = copy.deepcopy(data)
    for assignment in overrides:
        apply_override(data, assignment)
    return structure(Recipe, data, "")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply ``key=value`` overrides, and check it strictly."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} does not exist") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not valid TOML: {exc}") from None
    data.setdefault("name", path.stem)
    return recipe_from_dict(data, overrides)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as TOML (every default written out)."""
    return tomli_w.dumps(recipe.to_dict())
