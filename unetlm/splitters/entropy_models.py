"""Where entropy splitters get their byte model from: the reader of trained models that the
built-in registration names (:meth:`unetlm.registry.Registry.set_trained_models`), so the
splitters, which sit below the floor that reads checkpoints, never import it, and every process
(prepare's workers included) finds the same reader. Imports no torch."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from unetlm.plugins import registry


class EntropyModels(Protocol):
    """Loads a checkpoint for an entropy splitter."""

    def load(self, path: str, device: str):
        """The model at ``path`` in eval mode on ``device``."""

    def files(self, path: Path) -> list[Path]:
        """The files the model at ``path`` is read from (they key the splitter's caches)."""


def entropy_models() -> EntropyModels:
    """The registered reader of trained models."""
    return registry().trained_models()
