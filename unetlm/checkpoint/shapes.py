"""Whether stored tensors fit a model: one error naming the first tensor that differs."""
from __future__ import annotations

from unetlm.checkpoint.errors import CheckpointError


def check_shapes(model: dict[str, list[int]], stored: dict[str, list[int]], where: str, model_source: str) -> None:
    """``model`` and ``stored``: tensor name -> shape, the model's in its own order. Stored tensors the
    model lacks, and the first whose shape differs, are an error; tensors the file lacks are the
    caller's to judge (tied weights are stored once)."""
    extra = [name for name in stored if name not in model]
    if extra:
        raise CheckpointError(
            f"{where} does not fit {model_source}: it holds {extra[0]}"
            + (f" (and {len(extra) - 1} more tensors)" if len(extra) > 1 else "")
            + ", which the model lacks"
        )
    for name, shape in model.items():
        if name in stored and list(stored[name]) != list(shape):
            raise CheckpointError(
                f"{where} does not fit {model_source}: {name} is {list(stored[name])} in the file, "
                f"{list(shape)} in the model"
            )
