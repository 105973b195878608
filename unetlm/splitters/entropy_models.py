"""Where entropy splitters get their byte model from. The splitters sit below the layer that
loads checkpoints and never import it; that layer (the CLI, :mod:`unetlm.api`, the tests)
installs a loader here, and prepare hands it to its worker processes. Imports no torch."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol


class EntropyModels(Protocol):
    """Loads a checkpoint for an entropy splitter."""

    def load(self, path: str, device: str):
        """The model at ``path`` in eval mode on ``device``."""

    def files(self, path: Path) -> list[Path]:
        """The files the model at ``path`` is read from (they key the splitter's caches)."""


_installed: EntropyModels | None = None


def use_entropy_models(models: EntropyModels | None) -> None:
    """Install (None: remove) the loader entropy splitters of this process read their model through."""
    global _installed
    _installed = models


def installed_entropy_models() -> EntropyModels | None:
    """The installed loader or None (to hand to another process)."""
    return _installed


def entropy_models() -> EntropyModels:
    """The installed loader; a clear error when a splitter needs its model and none is installed."""
    if _installed is None:
        raise RuntimeError(
            "entropy splitter: no checkpoint loader installed; call unetlm.splitters.entropy_models."
            "use_entropy_models(unetlm.train.trained_models.TrainedModels()) (importing unetlm.api does it)"
        )
    return _installed
