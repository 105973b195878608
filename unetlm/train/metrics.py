"""Where a run's records go: JSON lines (one record per log step, appended: a resumed run keeps
its history), TensorBoard and Weights & Biases (optional extras, imported only when asked for)."""
from __future__ import annotations

import json
import math
import os
import secrets
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

    def keep_until(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a resumed run's lost segment) and any torn line;
        returns how many lines were dropped. The file is replaced atomically."""
        if not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += line.strip() != ""
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        return dropped


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scalars(record: dict) -> dict[str, float]:
    """The plain numbers of a record (what TensorBoard and W&B plot), ``step`` left out."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def open_tensorboard(path: Path, purge_step: int | None = None):
    """A TensorBoard SummaryWriter (``training.tensorboard = true``); ``purge_step``: a resumed
    run's first step, from which earlier events of the lost segment are dropped."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from unetlm.recipe.errors import RecipeError

        raise RecipeError("training.tensorboard = true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(path), purge_step=purge_step)


def open_wandb(settings, run_dir: Path, config: dict):
    """A Weights & Biases run (``training.wandb``): the same W&B run id for every start of one run
    directory (kept in ``RUN_DIR/wandb-id``), so a resumed run continues its curves."""
    try:
        import wandb
    except ImportError:
        from unetlm.recipe.errors import RecipeError

        raise RecipeError("training.wandb needs the wandb package: pip install 'unetlm[wandb]'") from None
    id_file = run_dir / "wandb-id"
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else secrets.token_hex(6)
    id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(
        project=settings.project, entity=settings.entity or None, group=settings.group or None,
        name=settings.name or run_dir.name, tags=list(settings.tags) or None, mode=settings.mode,
        id=run_id, resume="allow", dir=str(run_dir), config=config,
    )
