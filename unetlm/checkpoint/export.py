"""``unetlm export``: a trained model consolidated into the form to share.

``OUT/model.safetensors`` (every weight in one file that loads without unpickling),
``recipe.toml``, for tokenized models ``tokenizer.json``, and ``manifest.json`` (sizes and
sha256 of those files, the step, the recipe's hash). Written into a hidden folder beside ``OUT``,
then renamed, so ``OUT`` is complete or absent; files and folder follow the user's umask.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from unetlm.checkpoint.errors import CheckpointError
from unetlm.checkpoint.manifest import file_record, recipe_sha256, write_manifest
from unetlm.checkpoint.trained import RECIPE, TOKENIZER, WEIGHTS, read_trained
from unetlm.recipe import dump_recipe

KIND = "unetlm-export"


def export(source: str | Path, out: str | Path, verify: bool = False) -> Path:
    """Consolidate the trained model at ``source`` (any form :mod:`unetlm.checkpoint.trained`
    reads) into the directory ``out``, which must not exist or be empty."""
    from safetensors.torch import save_model

    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CheckpointError(f"--out {out} exists and is not an empty directory; choose another --out")
    model, recipe, step = read_trained(source, verify)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "recipe": recipe.name or ""})
        os.chmod(tmp / WEIGHTS, 0o666 & ~_umask())  # safetensors writes its file private (0600)
        (tmp / RECIPE).write_text(dump_recipe(recipe), encoding="utf-8")
        names = [WEIGHTS, RECIPE]
        if recipe.model.tokenizer is not None:
            (tmp / TOKENIZER).write_text(model.tokenizer.to_json(), encoding="utf-8")
            names.append(TOKENIZER)
        files = {name: file_record(tmp / name) for name in names}
        write_manifest(tmp, files, KIND, step, recipe_sha256(recipe.to_dict()))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
