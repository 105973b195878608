"""The recipe schema: attrs classes checked strictly when a TOML recipe is loaded.

Component sections (``splitter``, ``pooler``, ``upsampler``, ``mixer``) are tables with a
``name`` key; the rest of the table is checked against the named component's own ``Config``.
"""
from __future__ import annotations

from typing import Any, Literal

import attrs

from unetlm.core.tokens import VOCAB
from unetlm.recipe.errors import RecipeError
from unetlm.recipe.structure import CONVERTER, structure, unstructure
from unetlm.recipe.validators import fraction, non_negative, non_negative_or_auto, positive, positive_or_auto
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


def component_field(kind: str) -> dict:
    """Field metadata: the field holds a ``kind`` component, built by :func:`structure_component`."""
    return {CONVERTER: lambda data, path: structure_component(kind, data, path)}


@attrs.define
class StageSpec:
    """One level of the U-Net. Stage 0 reads bytes; stage s > 0 reads the pooled stage s - 1."""

    dim: int = attrs.field(validator=positive)
    layers: int = attrs.field(validator=non_negative)
    mixer: Component = attrs.field(metadata=component_field("mixer"))
    decoder_layers: int | None = attrs.field(default=None, validator=non_negative)
    # positions this stage holds per row; "auto": sized from the data when training starts
    max_len: int | Literal["auto"] | None = attrs.field(default=None, validator=positive_or_auto)
    splitter: Component | None = attrs.field(default=None, metadata=component_field("splitter"))
    pooler: Component | None = attrs.field(default=None, metadata=component_field("pooler"))
    upsampler: Component | None = attrs.field(default=None, metadata=component_field("upsampler"))
    # this stage's parameters train at training.lr times this (None: 1.0); see UNet.parameter_stages
    lr_multiplier: float | None = attrs.field(default=None, validator=positive)


@attrs.define
class EmbeddingSpec:
    """``[model.embedding]``: hashed n-gram tables added to the byte embedding (BLT)."""

    hash_ngrams: list[int] = attrs.field(factory=list)  # n-gram sizes, e.g. [3, 4, 5, 6, 7, 8]
    hash_buckets: int = attrs.field(default=30000, validator=positive)  # rows of each n-gram table

    def check(self, path: str) -> None:
        for i, n in enumerate(self.hash_ngrams):
            if not 2 <= n <= 16:
                raise RecipeError(f"{path}.hash_ngrams[{i}] = {n} is invalid: expected an n-gram size from 2 to 16")
        if len(set(self.hash_ngrams)) != len(self.hash_ngrams):
            raise RecipeError(f"{path}.hash_ngrams = {self.hash_ngrams} is invalid: the sizes must be distinct")


@attrs.define
class TokenizerSpec:
    """``[model.tokenizer]``: read subword tokens instead of bytes (the BPE baseline).

    The tokenizer is trained on the run's training split when training starts and saved with
    the checkpoint; ids 0-257 stay the bytes, BOS and PAD (see :mod:`unetlm.data.bpe`).
    """

    name: Literal["bpe"] = "bpe"
    vocab_size: int = attrs.field(default=4096, validator=positive)  # byte ids and specials included
    train_bytes: int = attrs.field(default=0, validator=non_negative)  # learn merges from this many bytes (0: all)

    def check(self, path: str) -> None:
        if self.vocab_size <= VOCAB:
            raise RecipeError(
                f"{path}.vocab_size = {self.vocab_size} is invalid: expected more than the {VOCAB} byte ids"
            )


@attrs.define
class ModelSpec:
    seq_len: int = attrs.field(validator=positive)
    stages: list[StageSpec]
    init_std: float = attrs.field(default=0.02, validator=positive)
    tie_embeddings: bool = False
    embedding: EmbeddingSpec = attrs.field(factory=EmbeddingSpec)
    tokenizer: TokenizerSpec | None = None  # None: the model reads bytes

    @property
    def vocab_size(self) -> int:
        return VOCAB if self.tokenizer is None else self.tokenizer.vocab_size

    @property
    def auto_lengths(self) -> list[int]:
        """Indices of the stages whose max_len is "auto" (sized from the data)."""
        return [i for i, s in enumerate(self.stages) if s.max_len == "auto"]

    def check(self, path: str) -> None:
        if not self.stages:
            raise RecipeError(f"{path}.stages = [] is invalid: expected at least one stage")
        if self.tokenizer is not None and len(self.stages) > 1:
            raise RecipeError(
                f"{path}.tokenizer: a tokenized model has one stage (splitters read bytes, its positions "
                f"are tokens); found {len(self.stages)} stages"
            )
        for i, stage in enumerate(self.stages):
            where = f"{path}.stages[{i}]"
            if i == 0:
                for key in ("splitter", "pooler", "upsampler"):
                    if getattr(stage, key) is not None:
                        raise RecipeError(f"{where}.{key}: stage 0 reads bytes and takes no {key}")
                if stage.max_len is not None and stage.max_len != self.seq_len:  # "auto" included
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
                if stage.max_len == "auto" and self.stages[i].splitter.build_class().learned:
                    raise RecipeError(
                        f"{where}.max_len = 'auto' is invalid: a learned splitter decides its boundaries inside "
                        f"the forward, so its stage cannot be sized from the data; give a number"
                    )
                if "auto" not in (stage.max_len, finer) and stage.max_len > finer:
                    raise RecipeError(
                        f"{where}.max_len = {stage.max_len} is invalid: a stage cannot hold more "
                        f"positions than the stage before it ({finer})"
                    )
            if i == len(self.stages) - 1 and stage.decoder_layers is not None:
                raise RecipeError(f"{where}.decoder_layers: the deepest stage has no decoder; use layers")
            if i > 1 and self.stages[i - 1].splitter.build_class().learned and not stage.splitter.build_class().learned:
                raise RecipeError(
                    f"{where}.splitter = {stage.splitter.name!r} is invalid: a byte-level splitter cannot follow "
                    f"the learned splitter of stage {i - 1} (its boundaries exist only inside the forward)"
                )
            for key in ("mixer", "pooler", "upsampler"):
                comp = getattr(stage, key)
                comp_check = getattr(comp.config if comp else None, "check_shapes", None)
                if comp_check is not None:
                    fine_dim = self.stages[i - 1].dim if i > 0 else stage.dim
                    comp_check(f"{where}.{key}", dim=stage.dim, fine_dim=fine_dim)


def check_device(spec: ModelSpec, device_type: str, training: bool) -> None:
    """RecipeError if a component's options need a device this run lacks (e.g. a CUDA-only
    backend on a CPU); components declare it with ``check_device(path, device_type, training)``."""
    for i, stage in enumerate(spec.stages):
        for key in ("mixer", "splitter", "pooler", "upsampler"):
            comp = getattr(stage, key)
            check = getattr(comp.config if comp else None, "check_device", None)
            if check is not None:
                check(f"model.stages[{i}].{key}", device_type, training)


@attrs.define
class PreparedSpec:
    """One prepared directory of a mixture, drawn in proportion to ``weight``."""

    path: str
    weight: float = attrs.field(default=1.0, validator=positive)


@attrs.define
class DataSpec:
    """Where documents come from; every source yields raw bytes (invalid UTF-8 is data).

    ``prepared``: train on directories written by ``unetlm prepare`` (one path, or a list of
    ``{path, weight}`` tables for a mixture) instead of preparing the sources into the cache.
    """

    # "none": the recipe names no corpus (the paper-scale ones): training asks for data.prepared or a source
    source: Literal["pydocs", "files", "jsonl", "parquet", "hf", "none"] = "pydocs"
    paths: list[str] = attrs.field(factory=list)  # files, jsonl, parquet: paths or globs
    text_field: str = "text"  # jsonl, parquet, hf: the column holding each document
    dataset: str = ""  # hf: the dataset name, e.g. "HuggingFaceFW/fineweb-edu"
    subset: str = ""  # hf: the configuration name
    split: str = "train"  # hf: the split to stream
    max_bytes: int = attrs.field(default=0, validator=non_negative)  # stop reading after this many (0: all)
    valid_fraction: float = attrs.field(default=0.1, validator=fraction)
    workers: int = attrs.field(default=0, validator=non_negative)  # loader processes preparing batches
    prepared: str | list[PreparedSpec] = ""  # prepared directories to train on ("": the sources, via the cache)

    @property
    def prepared_dirs(self) -> list[PreparedSpec]:
        """The prepared directories with their weights ([]: none, train on the sources)."""
        return [PreparedSpec(self.prepared)] if isinstance(self.prepared, str) and self.prepared else list(
            self.prepared or []
        )

    def check(self, path: str) -> None:
        if isinstance(self.prepared, list):
            if not self.prepared:
                raise RecipeError(f"{path}.prepared = [] is invalid: expected a directory or a non-empty list of "
                                  f"{{path = DIR, weight = W}} tables")
            seen = set()
            for i, part in enumerate(self.prepared):
                if not part.path:
                    raise RecipeError(f"{path}.prepared[{i}].path = '' is invalid: expected a prepared directory")
                if part.path in seen:
                    raise RecipeError(f"{path}.prepared[{i}].path = {part.path!r} is invalid: listed twice")
                seen.add(part.path)
        if self.source in ("files", "jsonl", "parquet") and not self.paths:
            raise RecipeError(f"{path}.paths = [] is invalid: source {self.source!r} needs at least one path")
        if self.source == "hf" and not self.dataset:
            raise RecipeError(f"{path}.dataset: required for source 'hf' (a Hugging Face dataset name)")
        if self.source == "hf" and not self.max_bytes:
            raise RecipeError(f"{path}.max_bytes: required for source 'hf' (how many bytes to stream)")


@attrs.define
class WandbSpec:
    """``training.wandb``: also send each record to Weights & Biases (the optional extra ``wandb``)."""

    project: str
    entity: str = ""  # the W&B team or user ("": the account's default)
    group: str = ""
    name: str = ""  # the W&B run's name ("": the run directory's name)
    tags: list[str] = attrs.field(factory=list)
    mode: Literal["online", "offline"] = "online"  # offline: written under RUN_DIR/wandb, `wandb sync` later


@attrs.define
class TrainingSpec:
    steps: int = attrs.field(default=300, validator=positive)
    batch_size: int | Literal["auto"] = attrs.field(default=8, validator=positive_or_auto)  # global, in sequences
    # sequences per forward on each process; gradients accumulate over a step's micro-batches (0: all at
    # once; "auto": the most that fit in device memory, from the planner, unetlm/train/plan.py)
    micro_batch_size: int | Literal["auto"] = attrs.field(default=0, validator=non_negative_or_auto)
    lr: float | Literal["auto"] = attrs.field(default=3e-3, validator=positive_or_auto)
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
    async_checkpoint: bool | Literal["auto"] = "auto"  # save in the background while training; auto: on CUDA
    sample_prompt: str = "The "
    sample_bytes: int = attrs.field(default=120, validator=non_negative)
    device: str = "auto"
    threads: int = attrs.field(default=0, validator=non_negative)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast; auto: bfloat16 on CUDA with bf16 support
    compile: bool | Literal["auto"] = "auto"  # torch.compile the model; auto: on CUDA only
    # recompute each mixer block in the backward pass; "auto": only where the planner finds that
    # not even one sequence per forward fits without it
    activation_checkpointing: bool | Literal["auto"] = False
    # FSDP2: ranks each parameter is sharded over (a node's GPUs); replicated across such groups (HSDP). 0: all
    # ranks; "auto": the fastest layout that fits, from the planner (unetlm/train/plan.py)
    shard_size: int | Literal["auto"] = attrs.field(default=0, validator=non_negative_or_auto)
    tensorboard: bool = False  # also write TensorBoard events to RUN_DIR/tensorboard
    # checkpoints kept in RUN_DIR/checkpoints/ (the oldest go once a newer one is committed)
    keep_checkpoints: int = attrs.field(default=2, validator=positive)
    # also checkpoint when this many minutes have passed since the last checkpoint (rank 0's clock; 0: off)
    checkpoint_every_minutes: float = attrs.field(default=0.0, validator=non_negative)
    log_every: int = attrs.field(default=1, validator=positive)  # steps per metrics record (reductions, host syncs)
    dist_timeout_minutes: float = attrs.field(default=30.0, validator=positive)  # a collective waiting longer fails
    wandb: WandbSpec | None = None  # absent: no Weights & Biases
    # dtype of FSDP2's gradient reduce-scatter and all-reduce (several processes); gradients accumulate in float32
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"


@attrs.define
class Recipe:
    model: ModelSpec
    name: str = ""
    description: str = ""
    data: DataSpec = attrs.field(factory=DataSpec)
    training: TrainingSpec = attrs.field(factory=TrainingSpec)

    def to_dict(self) -> dict:
        return unstructure(self)
