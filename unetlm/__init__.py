"""unetlm: tokenizer-free hierarchical byte language models composed from registered parts.

The small public API (see docs/api.md)::

    recipe = unetlm.load_recipe("recipes/tiny/au2.toml", ["training.steps=10"])
    model = unetlm.build_model(recipe)
    logits = model(unetlm.encode(b"hello world").unsqueeze(0)).logits
    model, recipe = unetlm.load_checkpoint("runs/au2")
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["build_model", "encode", "generate", "load_checkpoint", "load_recipe", "summarize"]


def __getattr__(name: str):
    # Lazy so that `import unetlm` (and `unetlm --help`) stays fast.
    if name == "load_recipe":
        from unetlm.recipe import load_recipe

        return load_recipe
    if name == "build_model":
        from unetlm.api import build_model

        return build_model
    if name == "load_checkpoint":
        from unetlm.api import load_checkpoint

        return load_checkpoint
    if name == "encode":
        from unetlm.core.tokens import encode

        return encode
    if name == "generate":
        from unetlm.model.generate import generate

        return generate
    if name == "summarize":
        from unetlm.model.summary import summarize

        return summarize
    raise AttributeError(f"module 'unetlm' has no attribute {name!r}")
