"""Trained models for use: read from a run directory, an exported directory or a single file,
and exported (consolidated) as safetensors.

Three forms are read, none of them by running code from the files:

- a run directory (``RUN_DIR``, or its ``RUN_DIR/checkpoint`` DCP directory): the sharded
  training checkpoint, whatever world size wrote it; the recipe and tokenizer come from its
  train record;
- an exported directory (``unetlm export``): ``model.safetensors`` (all weights, one file),
  ``recipe.toml`` (the resolved recipe) and, for tokenized models, ``tokenizer.json``;
- a single ``.pt`` file holding ``{"model": state dict, "recipe": dict, "tokenizer": JSON text}``
  of plain types, read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from unetlm.model.build import build_model
from unetlm.recipe import Recipe, dump_recipe, load_recipe, recipe_from_dict
from unetlm.train import checkpoint as fmt
from unetlm.train.errors import CheckpointError

WEIGHTS = "model.safetensors"
RECIPE = "recipe.toml"
TOKENIZER = "tokenizer.json"


def attach_tokenizer(model, tokenizer_json: str | None) -> None:
    if tokenizer_json is not None:
        from unetlm.data.bpe import BpeTokenizer

        model.tokenizer = BpeTokenizer.from_json(tokenizer_json)


def _from_run(directory: Path):
    train = fmt.read_train_state(directory)
    recipe = recipe_from_dict(train["recipe"])
    model = build_model(recipe)
    state = {"model": model.state_dict()}
    fmt.read_into(state, directory, distributed=False)
    model.load_state_dict(state["model"])
    attach_tokenizer(model, train.get("tokenizer"))
    return model, recipe


def _from_export(directory: Path):
    from safetensors.torch import load_model

    recipe = load_recipe(directory / RECIPE)
    model = build_model(recipe)
    missing, unexpected = load_model(model, str(directory / WEIGHTS), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / WEIGHTS} does not fit {directory / RECIPE}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    tokenizer = directory / TOKENIZER
    attach_tokenizer(model, tokenizer.read_text(encoding="utf-8") if tokenizer.is_file() else None)
    return model, recipe


def _from_file(path: Path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain data, and unpickling "
            f"them could run code ({first})"
        ) from None
    except Exception as exc:  # any other file: torch's reader fails in many ways on foreign bytes
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a unetlm checkpoint ({reason})") from None
    if not isinstance(state, dict) or not {"model", "recipe"} <= set(state):
        raise CheckpointError(f"{path} is not a unetlm checkpoint: it lacks the 'model' and 'recipe' entries")
    recipe = recipe_from_dict(state["recipe"])
    model = build_model(recipe)
    model.load_state_dict(state["model"])
    attach_tokenizer(model, state.get("tokenizer"))
    return model, recipe


def load_trained(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[object, Recipe]:
    """(model in eval mode, recipe) from any of the three forms above."""
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS).is_file():
            model, recipe = _from_export(path)
        elif (directory := fmt.find_checkpoint(path)) is not None:
            model, recipe = _from_run(directory)
        else:
            raise CheckpointError(
                f"{path} holds no checkpoint: expected a run directory (with {fmt.CHECKPOINT}/), a DCP "
                f"checkpoint directory or an exported directory (with {WEIGHTS})"
            )
    elif path.is_file():
        model, recipe = _from_file(path)
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    model.to(map_location)
    model.eval()
    return model, recipe


def weight_files(path: str | Path) -> list[Path]:
    """The files a trained model is read from (to fingerprint it): the file itself, the exported
    weights and recipe, or the checkpoint directory's files."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / WEIGHTS).is_file():
        return [p for p in (path / WEIGHTS, path / RECIPE, path / TOKENIZER) if p.is_file()]
    directory = fmt.find_checkpoint(path)
    if directory is None:
        return []
    return sorted(p for p in directory.iterdir() if p.is_file())


def export(source: str | Path, out: str | Path) -> Path:
    """Consolidate a trained model (any form above) into ``out``: ``model.safetensors``,
    ``recipe.toml`` and, for tokenized models, ``tokenizer.json``. Written into a temporary
    directory beside ``out``, then renamed, so ``out`` is complete or absent."""
    from safetensors.torch import save_model

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; choose another --out")
    model, recipe = load_trained(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "recipe": recipe.name or ""})
        (tmp / RECIPE).write_text(dump_recipe(recipe), encoding="utf-8")
        if recipe.model.tokenizer is not None:
            (tmp / TOKENIZER).write_text(model.tokenizer.to_json(), encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
