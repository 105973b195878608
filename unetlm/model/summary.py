"""Parameters and training FLOPs per byte, counted from the static shapes; the bytes of the
masks a training step's stages share (:func:`stage_mask_bytes`).

Convention: a matmul of (m x k) by (k x n) costs 2mkn FLOPs; attention adds
4 * heads * head_dim * (mean keys per query) per query (scores and values), with sliding
windows and causality counted exactly; training costs 3x the forward (forward + backward).
Every stage is charged for its full static length, padding included: that is the compute
the model spends. The embedding lookup is free; the output head is counted. A tokenized
model's FLOPs per byte are its FLOPs per token over the bytes per token measured on its
training text.
"""
from __future__ import annotations

import attrs
from torch import nn


def stage_mask_bytes(model, rows: int) -> list[int]:
    """Per stage, bytes of what it builds once per batch and keeps until the backward (on CUDA,
    attention's FlexAttention block masks) for ``rows`` sequences: one mask per stage, its encoder
    and decoder sharing it (``Mixer.mask_bytes``). The planner counts them as extra buffers."""
    sizes = []
    for s, length in enumerate(model.lengths):
        stacks = [model.middle] if s == len(model.lengths) - 1 else [model.encoders[s], model.decoders[s]]
        sizes.append(max((m.mask_bytes(rows, length) for stack in stacks for m in stack.mixers()), default=0))
    return sizes


def count_params(*modules: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@attrs.define
class StageSummary:
    index: int
    dim: int
    layers: int
    decoder_layers: int
    max_len: int
    mixer: str
    splitter: str
    heads: str
    params: int
    train_flops: float  # per sequence


@attrs.define
class ModelSummary:
    stages: list[StageSummary]
    params: int
    seq_len: int  # positions per sequence: bytes, or tokens for a tokenized model
    bytes_per_token: float | None  # 1 for byte models; None: the tokenizer is not trained yet

    @property
    def train_flops_per_token(self) -> float:
        return sum(s.train_flops for s in self.stages) / self.seq_len

    @property
    def train_flops_per_byte(self) -> float:
        if self.bytes_per_token is None:
            raise ValueError("FLOPs per byte of a tokenized model need its trained tokenizer (bytes per token)")
        return self.train_flops_per_token / self.bytes_per_token


def summarize(model) -> ModelSummary:
    spec = model.spec
    n = len(spec.stages)
    stage_params = model.parameter_stages()  # learned splitters included
    rows = []
    for i, stage in enumerate(spec.stages):
        last = i == n - 1
        mixers = [model.middle] if last else [model.encoders[i], model.decoders[i]]
        flops = sum(m.forward_flops(stage.max_len) for m in mixers)
        if i > 0:
            fine_len = spec.stages[i - 1].max_len
            flops += model.poolers[i - 1].forward_flops(fine_len, stage.max_len)
            flops += model.upsamplers[i - 1].forward_flops(fine_len, stage.max_len)
        else:
            flops += 2.0 * stage.dim * spec.vocab_size * stage.max_len
        cfg = stage.mixer.config
        heads = f"{cfg.n_heads(stage.dim)}x{cfg.head_dim}" if hasattr(cfg, "n_heads") else "-"
        window = getattr(cfg, "window", 0)
        mixer = stage.mixer.name + (f" (window {window})" if window else "")
        splitter = "-" if stage.splitter is None else _describe_component(stage.splitter)
        rows.append(
            StageSummary(
                index=i,
                dim=stage.dim,
                layers=stage.layers,
                decoder_layers=0 if last else (stage.layers if stage.decoder_layers is None else stage.decoder_layers),
                max_len=stage.max_len,
                mixer=mixer,
                splitter=splitter,
                heads=heads,
                params=sum(p.numel() for p in stage_params[i]),
                train_flops=3.0 * flops,
            )
        )
    tokenizer = model.tokenizer
    return ModelSummary(rows, count_params(model), spec.seq_len, None if tokenizer is None else tokenizer.bytes_per_token)


def _describe_component(comp) -> str:
    options = ", ".join(f"{k}={v}" for k, v in attrs.asdict(comp.config).items() if v is not None)
    return f"{comp.name}({options})" if options else comp.name
