"""Strict conversion of TOML data into attrs classes: no silent coercions.

``structure(cls, data, path)`` checks every key against the class's fields, every value against
the field's annotated type and validators, and raises :class:`RecipeError` naming the key path.
A field whose metadata holds a :data:`CONVERTER` (``convert(value, path) -> object``) is built by
that function instead of by its annotation (a recipe's component tables are).
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal, Union

import attrs

from unetlm.recipe.errors import RecipeError

#: field metadata key: ``convert(value, path)`` builds the field's value from its TOML data
CONVERTER = "unetlm.structure"


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if tp is type(None):
        return "absent"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {describe_type(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a table"
    if attrs.has(tp):
        return "a table"
    return str(tp)


def _fail(path: str, value: Any, allowed: str) -> RecipeError:
    return RecipeError(f"{path} = {value!r} is invalid: expected {allowed}")


def structure_value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if type(value) is not bool:
            raise _fail(path, value, "true or false")
        return value
    if tp is int:
        if type(value) is not int:
            raise _fail(path, value, "an integer")
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise _fail(path, value, "a number")
        return float(value)
    if tp is str:
        if type(value) is not str:
            raise _fail(path, value, "a string")
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is bool:
            raise _fail(path, value, describe_type(tp))
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return structure_value(arg, value, path)
            except RecipeError as exc:
                errors.append(exc)
        tables = [a for a in args if attrs.has(a)]
        if isinstance(value, dict) and len(tables) == 1:  # a table for the one table type: its own error says more
            raise errors[[a for a in args if a is not type(None)].index(tables[0])]
        lists = [a for a in args if typing.get_origin(a) is list]
        if isinstance(value, list) and len(lists) == 1:  # likewise a list for the one list type
            raise errors[[a for a in args if a is not type(None)].index(lists[0])]
        raise _fail(path, value, describe_type(tp))
    if origin is list:
        if not isinstance(value, list):
            raise _fail(path, value, describe_type(tp))
        (item,) = typing.get_args(tp)
        return [structure_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, value, "a table")
        return dict(value)
    if attrs.has(tp):
        return structure(tp, value, path)
    raise TypeError(f"unsupported recipe type {tp!r} at {path}")


def structure(cls: type, data: Any, path: str) -> Any:
    """Build ``cls`` (an attrs class) from a TOML table, strictly."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise _fail(path or "recipe", data, "a table")
    fields = attrs.fields_dict(cls)
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=2)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise RecipeError(
            f"{_join(path, key)}: unknown key{hint} (allowed keys: {', '.join(fields)})"
        )
    kwargs = {}
    for name, field in fields.items():
        key_path = _join(path, name)
        if name not in data:
            if field.default is attrs.NOTHING:
                raise RecipeError(f"{key_path}: required key is missing ({describe_type(hints[name])})")
            continue
        convert = field.metadata.get(CONVERTER)
        if convert is not None:
            value = None if data[name] is None else convert(data[name], key_path)
        else:
            value = structure_value(hints[name], data[name], key_path)
        if field.validator is not None:
            try:
                field.validator(None, field, value)
            except (TypeError, ValueError) as exc:
                raise RecipeError(f"{key_path} = {value!r} is invalid: {_validator_text(exc)}") from None
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{path or 'recipe'}: {exc}") from None
    check = getattr(obj, "check", None)
    if check is not None:
        check(path)
    return obj


def _validator_text(exc: Exception) -> str:
    return str(exc.args[0]) if exc.args else str(exc)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def unstructure(obj: Any) -> Any:
    """attrs instance -> plain TOML-ready data (None values dropped)."""
    to_table = getattr(obj, "to_table", None)
    if to_table is not None:
        return to_table()
    if attrs.has(type(obj)):
        out = {}
        for field in attrs.fields(type(obj)):
            value = unstructure(getattr(obj, field.name))
            if value is not None:
                out[field.name] = value
        return out
    if isinstance(obj, list):
        return [unstructure(v) for v in obj]
    if isinstance(obj, dict):
        return {k: unstructure(v) for k, v in obj.items() if v is not None}
    return obj
