"""The checkpoint loader entropy splitters read their model through
(:mod:`unetlm.splitters.entropy_models`); light to import, it loads :mod:`unetlm.train.weights` on use."""
from __future__ import annotations

from pathlib import Path


class TrainedModels:
    """Trained models in any form :func:`unetlm.train.weights.load_trained` reads."""

    def load(self, path: str, device: str):
        from unetlm.train.weights import load_trained

        return load_trained(path, device)[0]

    def files(self, path: Path) -> list[Path]:
        from unetlm.train.weights import weight_files

        return weight_files(path)
