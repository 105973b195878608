"""The recipe schema: attrs classes checked strictly when a TOML recipe is loaded.

Component sections (``splitter``, ``pooler``, ``upsampler``, ``mixer``) are tables with a
``name`` key; the rest of the table is checked against the named component's own ``Config``.
"""
from __future__ import annotations

from typing import Any, Literal

import attrs

from unetlm.recipe.errors import RecipeError
from unetlm.recipe.structure import fraction, non_negative, positive, structure, unstructure
from unetlm.registry import RegistryError


@attrs.define
class Component:
    """A registered component chosen by name, with its checked config."""

    kind: str
    name: str
    config: Any

    def build_class(self) -> type:
        from unetlm.plugins import registry

        return registry().get(self.kind, self.name)

    def to_table(self) -> dict:
        return {"name": self.name, **unstructure(self.config)}


def structure_component(kind: str, data: Any, path: str) -> Component:
    from unetlm.plugins import registry

    if isinstance(data, Component):
        return data
    if not isinstance(data, dict):
        raise RecipeError(f"{path} = {data!r} is invalid: expected a table with a 'name' key")
    if "name" not in data:
        raise RecipeError(f"{path}.name: required key is missing (a registered {kind} name)")
    name = data["name"]
    try:
        cls = registry().get(kind, name)
    except RegistryError as exc:
        raise RecipeError(f"{path}.name = {name!r} is invalid: {exc}") from None
    options = {k: v for k, v in data.items() if k != "name"}
    config = structure(cls.Config, options, path)
    return Component(kind, name, config)


@attrs.define
class StageSpec:
    """One level of the U-Net. Stage 0 reads bytes; stage s > 0 reads the pooled stage s - 1."""

    dim: int = attrs.field(validator=positive)
    layers: int = attrs.field(validator=non_negative)
    mixer: Component = attrs.field(metadata={"component": "mixer"})
    decoder_layers: int | None = attrs.field(default=None, validator=non_negative)
    max_len: int | None = attrs.field(default=None, validator=positive)
    splitter: Component | None = attrs.field(default=None, metadata={"component": "splitter"})
    pooler: Component | None = attrs.field(default=None, metadata={"component": "pooler"})
    upsampler: Component | None = attrs.field(default=None, metadata={"component": "upsampler"})


@attrs.define
class ModelSpec:
    seq_len: int = attrs.field(validator=positive)
    stages: list[StageSpec]
    init_std: float = attrs.field(default=0.02, validator=positive)
    tie_embeddings: bool = False

    def check(self, path: str) -> None:
        if not self.stages:
            raise RecipeError(f"{path}.stages = [] is invalid: expected at least one stage")
        for i, stage in enumerate(self.stages):
            where = f"{path}.stages[{i}]"
            if i == 0:
                for key in ("splitter", "pooler", "upsampler"):
                    if getattr(stage, key) is not None:
                        raise RecipeError(f"{where}.{key}: stage 0 reads bytes and takes no {key}")
                if stage.max_len is not None and stage.max_len != self.seq_len:
                    raise RecipeError(
                        f"{where}.max_len = {stage.max_len} is invalid: stage 0 holds the "
                        f"sequence, so it must equal model.seq_len = {self.seq_len}"
                    )
                stage.max_len = self.seq_len
            else:
                for key in ("splitter", "pooler", "upsampler"):
                    if getattr(stage, key) is None:
                        raise RecipeError(f"{where}.{key}: required for stage {i} (a table with a name)")
                if stage.max_len is None:
                    raise RecipeError(f"{where}.max_len: required for stage {i} (a positive integer)")
                finer = self.stages[i - 1].max_len
                if stage.max_len > finer:
                    raise RecipeError(
                        f"{where}.max_len = {stage.max_len} is invalid: a stage cannot hold more "
                        f"positions than the stage before it ({finer})"
                    )
            if i == len(self.stages) - 1 and stage.decoder_layers is not None:
                raise RecipeError(f"{where}.decoder_layers: the deepest stage has no decoder; use layers")
            for key in ("mixer", "pooler", "upsampler"):
                comp = getattr(stage, key)
                comp_check = getattr(comp.config if comp else None, "check_shapes", None)
                if comp_check is not None:
                    fine_dim = self.stages[i - 1].dim if i > 0 else stage.dim
                    comp_check(f"{where}.{key}", dim=stage.dim, fine_dim=fine_dim)


@attrs.define
class DataSpec:
    source: Literal["pydocs", "files"] = "pydocs"
    paths: list[str] = attrs.field(factory=list)
    valid_fraction: float = attrs.field(default=0.1, validator=fraction)

    def check(self, path: str) -> None:
        if self.source == "files" and not self.paths:
            raise RecipeError(f"{path}.paths = [] is invalid: source 'files' needs at least one path")


@attrs.define
class TrainingSpec:
    steps: int = attrs.field(default=300, validator=positive)
    batch_size: int = attrs.field(default=8, validator=positive)
    lr: float = attrs.field(default=3e-3, validator=positive)
    min_lr_fraction: float = attrs.field(default=0.1, validator=fraction)
    warmup_fraction: float = attrs.field(default=0.1, validator=fraction)
    weight_decay: float = attrs.field(default=0.1, validator=non_negative)
    grad_clip: float = attrs.field(default=0.2, validator=non_negative)
    beta1: float = attrs.field(default=0.9, validator=fraction)
    beta2: float = attrs.field(default=0.95, validator=fraction)
    seed: int = 0
    eval_every: int = attrs.field(default=100, validator=positive)
    eval_batches: int = attrs.field(default=4, validator=positive)
    checkpoint_every: int = attrs.field(default=100, validator=positive)
    sample_prompt: str = "The "
    sample_bytes: int = attrs.field(default=120, validator=non_negative)
    device: str = "auto"
    threads: int = attrs.field(default=0, validator=non_negative)


@attrs.define
class Recipe:
    model: ModelSpec
    name: str = ""
    description: str = ""
    data: DataSpec = attrs.field(factory=DataSpec)
    training: TrainingSpec = attrs.field(factory=TrainingSpec)

    def to_dict(self) -> dict:
        return unstructure(self)
