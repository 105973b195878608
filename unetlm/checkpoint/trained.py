"""Trained models for use, read from any of three forms without running code from the files:

- a run directory (``RUN_DIR``, or one of its checkpoint folders): the newest checkpoint that
  checks out (:mod:`unetlm.checkpoint.store`), whatever world size wrote it; the recipe and
  tokenizer come from its train record;
- an exported directory (``unetlm export``, :mod:`unetlm.checkpoint.export`): ``model.safetensors``,
  ``recipe.toml``, for tokenized models ``tokenizer.json``, and ``manifest.json``;
- a single ``.pt`` file holding ``{"model": state dict, "recipe": dict, "tokenizer": JSON text}``
  of plain types, read with ``torch.load(weights_only=True)``.

``verify``: check every file's sha256 against its manifest before reading.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from unetlm.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from unetlm.checkpoint.manifest import check_files, read_manifest
from unetlm.checkpoint.safe import first_line, refusal, weights_only_reason
from unetlm.checkpoint.shapes import check_shapes
from unetlm.checkpoint.sharded import read_into, read_train_state
from unetlm.checkpoint.store import CHECKPOINTS, latest
from unetlm.model.build import build_model
from unetlm.recipe import Recipe, load_recipe, recipe_from_dict

WEIGHTS = "model.safetensors"
RECIPE = "recipe.toml"
TOKENIZER = "tokenizer.json"


def attach_tokenizer(model, tokenizer_json: str | None, where: str) -> None:
    if tokenizer_json is None:
        return
    from unetlm.data.bpe import BpeTokenizer

    try:
        model.tokenizer = BpeTokenizer.from_json(tokenizer_json)
    except ImportError:
        raise
    except Exception as exc:  # the tokenizers library raises its own plain Exception on bad JSON
        raise CheckpointError(f"{where}: the tokenizer is damaged ({type(exc).__name__}: {first_line(exc)})") from None


def _from_run(directory: Path):
    train = read_train_state(directory)
    recipe = recipe_from_dict(train["recipe"])
    model = build_model(recipe)
    state = {"model": model.state_dict()}
    read_into(state, directory, distributed=False)
    model.load_state_dict(state["model"])
    attach_tokenizer(model, train.get("tokenizer"), str(directory))
    return model, recipe, train.get("step")


def _from_export(directory: Path, verify: bool):
    from safetensors import safe_open
    from safetensors.torch import load_model

    manifest = read_manifest(directory)
    if manifest is not None:
        check_files(directory, manifest, verify)
    recipe = load_recipe(directory / RECIPE)
    model = build_model(recipe)
    weights = directory / WEIGHTS
    try:
        with safe_open(str(weights), "pt") as f:
            stored = {name: f.get_slice(name).get_shape() for name in f.keys()}
    except Exception as exc:  # safetensors' own error type for a cut or foreign file
        raise CheckpointError(f"{weights} is damaged: {first_line(exc)}") from None
    check_shapes({k: list(v.shape) for k, v in model.state_dict().items()}, stored, str(weights), str(directory / RECIPE))
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit {directory / RECIPE}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    tokenizer = directory / TOKENIZER
    attach_tokenizer(model, tokenizer.read_text(encoding="utf-8") if tokenizer.is_file() else None, str(tokenizer))
    return model, recipe, (manifest or {}).get("step")


def _from_file(path: Path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        error = refusal(exc, str(path))
        if isinstance(error, UnsafeCheckpointError):
            raise error from None
        raise CheckpointError(f"{path} is not a unetlm checkpoint ({weights_only_reason(exc)})") from None
    except Exception as exc:  # any other file: torch's reader fails in many ways on foreign bytes
        raise CheckpointError(f"{path} is not a unetlm checkpoint ({first_line(exc)})") from None
    if not isinstance(state, dict) or not {"model", "recipe"} <= set(state) or not isinstance(state["model"], dict):
        raise CheckpointError(f"{path} is not a unetlm checkpoint: it lacks the 'model' and 'recipe' entries")
    recipe = recipe_from_dict(state["recipe"])
    model = build_model(recipe)
    stored = {k: list(v.shape) for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    check_shapes({k: list(v.shape) for k, v in model.state_dict().items()}, stored, str(path), "its recipe")
    model.load_state_dict(state["model"])
    attach_tokenizer(model, state.get("tokenizer"), str(path))
    return model, recipe, state.get("step")


def read_trained(path: str | Path, verify: bool = False) -> tuple[object, Recipe, int | None]:
    """(model, recipe, step or None) from any of the three forms above, on the CPU."""
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS).is_file():
        return _from_export(path, verify)
    if path.is_dir():
        found = latest(path, _from_run, verify)
        if found is None:
            raise CheckpointError(
                f"{path} holds no checkpoint: expected a run directory (with {CHECKPOINTS}/), a checkpoint "
                f"folder or an exported directory (with {WEIGHTS})"
            )
        return found[1]
    if path.is_file():
        return _from_file(path)
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist")


def load_trained(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = False):
    """(model in eval mode on ``map_location``, recipe) from any of the three forms above."""
    model, recipe, _ = read_trained(path, verify)
    model.to(map_location)
    model.eval()
    return model, recipe


def weight_files(path: str | Path) -> list[Path]:
    """The files a trained model is read from (to fingerprint it): the file itself, the exported
    directory's files, or those of the checkpoint folder a run directory is read from."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / WEIGHTS).is_file():
        return sorted(p for p in path.iterdir() if p.is_file())
    found = latest(path, lambda directory: None)
    return [] if found is None else sorted(p for p in found[0].iterdir() if p.is_file())


class TrainedModels:
    """The reader of trained models that entropy splitters load their byte model through
    (:mod:`unetlm.splitters.entropy_models`; registered by :mod:`unetlm.builtins`)."""

    def load(self, path: str, device: str):
        return load_trained(path, device)[0]

    def files(self, path: Path) -> list[Path]:
        return weight_files(path)
