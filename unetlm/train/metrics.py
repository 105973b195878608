"""Metrics as JSON lines, one record per event, appended (a resumed run keeps its history)."""
from __future__ import annotations

import json
import math
from pathlib import Path

LN2 = math.log(2.0)


def bits_per_byte(loss_nats: float) -> float:
    return loss_nats / LN2


class MetricsWriter:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def open_tensorboard(path: Path):
    """A TensorBoard SummaryWriter (``training.tensorboard = true``); imported only when asked for."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from unetlm.recipe.errors import RecipeError

        raise RecipeError("training.tensorboard = true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(path))
