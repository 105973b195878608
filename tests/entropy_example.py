"""A tiny, randomly initialised entropy model for tests that need an entropy checkpoint but no
trained one (the registry-wide properties, ``recipes/tiny/blt.toml``)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import attrs
import torch

from unetlm.splitters.entropy import EntropyConfig

EXAMPLE_THRESHOLD = 4.0  # nats: about the median entropy of the example model on text
EXAMPLE_MODEL = {
    "seq_len": 32,
    "init_std": 0.5,  # a random model with strongly varying entropies
    "stages": [{"dim": 16, "layers": 1, "mixer": {"name": "attention", "head_dim": 8}}],
}


def ensure_example_checkpoint() -> str:
    """Path of the example entropy model (seed 0), written on first use into the temporary
    directory, atomically, keyed by its weights (a file from another parameter layout is never
    loaded). Real tensors also under a meta default device or the planner's fake-tensor mode."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from unetlm.api import build_model
    from unetlm.recipe import recipe_from_dict

    data = {"name": "entropy-example", "model": EXAMPLE_MODEL}
    with unset_fake_temporarily(), torch.device("cpu"), torch.random.fork_rng(devices=[]):
        recipe = recipe_from_dict(data)
        torch.manual_seed(0)
        model = build_model(recipe)
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode())
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        path = Path(tempfile.gettempdir()) / "unetlm-examples" / f"entropy-{digest.hexdigest()[:16]}.pt"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                torch.save({"recipe": recipe.to_dict(), "model": model.state_dict()}, f)
            os.replace(tmp, path)
    return str(path)


def with_example_options(options: dict) -> dict:
    """An entropy splitter's option table with its checkpoint pointed at the example model."""
    return {**options, "checkpoint": ensure_example_checkpoint()}


def with_example_checkpoint(recipe):
    """``recipe`` with every entropy splitter pointed at the example model (and a global
    threshold that suits it, :data:`EXAMPLE_THRESHOLD`)."""
    path = ensure_example_checkpoint()
    for stage in recipe.model.stages:
        cfg = None if stage.splitter is None else stage.splitter.config
        if isinstance(cfg, EntropyConfig):
            only_relative = cfg.threshold is None and cfg.relative_threshold is not None
            stage.splitter.config = attrs.evolve(
                cfg, checkpoint=path, threshold=None if only_relative else EXAMPLE_THRESHOLD, context=None, cache_dir=None
            )
    return recipe
