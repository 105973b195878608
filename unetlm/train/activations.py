"""Activation memory, measured: the bytes autograd saves for backward during a training forward.

``count_saved_bytes`` adds up the distinct storages that ``saved_tensors_hooks`` sees (the
model's parameters left out), for real and fake tensors alike. ``measure_activations`` builds
the model under ``FakeTensorMode`` (shapes and dtypes, no storage: nothing is allocated) and
runs it at 1 and 2 sequences, with and without activation checkpointing, under bfloat16
autocast or in float32: the difference is the cost per sequence. The forward takes the CPU code
path (SDPA; on CUDA FlexAttention saves no more, so there the figure is an upper bound for
sliding-window attention).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import attrs
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from unetlm.model.build import build_model
from unetlm.model.stack import Stack
from unetlm.recipe.structure import unstructure
from unetlm.train.parallelize import apply_activation_checkpointing, mixer_stacks


class MeasurementError(ValueError):
    """The model's forward does not run on fake tensors, so its activations cannot be measured."""


def _storage_key(t: torch.Tensor):
    return StorageWeakRef(t.untyped_storage())


@attrs.define
class SavedBytes:
    """Bytes autograd keeps for backward: in total and by the module (a mixer stack) that saved them."""

    total: int = 0
    by_stack: dict = attrs.field(factory=dict)


def count_saved_bytes(model: torch.nn.Module, run: Callable[[], object]) -> SavedBytes:
    """Run ``run()`` (a forward of ``model``) and count the distinct storages saved for backward,
    leaving out the model's parameters; real and fake tensors alike."""
    params = {_storage_key(p) for p in model.parameters()}
    seen: set = set()
    kept: list[torch.Tensor] = []  # alive until the count ends, so no storage address is reused
    out = SavedBytes()
    current: list[str] = []

    def enter(name: str):
        return lambda module, args: current.append(name)

    def leave(module, args, output) -> None:
        current.pop()

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Stack):
            hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in params and key not in seen:
            seen.add(key)
            kept.append(t)
            size = t.untyped_storage().nbytes()
            out.total += size
            if current:
                out.by_stack[current[-1]] = out.by_stack.get(current[-1], 0) + size
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    return out


def example_inputs(model, rows: int, seq_len: int) -> tuple:
    """(tokens, doc, masks, targets) of ``rows`` sequences: shapes are all the planner needs."""
    tokens = torch.randint(0, 256, (rows, seq_len))
    doc = torch.zeros(rows, seq_len, dtype=torch.long)
    masks = [torch.zeros(rows, seq_len, dtype=torch.bool) for _ in model.splitters]
    return tokens, doc, masks, tokens.clone()


def saved_by_forward(model, inputs: tuple, checkpointing: bool, autocast: bool = True) -> SavedBytes:
    """Saved bytes of one training forward of ``inputs`` (the CPU's code path), under bfloat16
    autocast or in float32."""
    stacks = mixer_stacks(model)
    before = [list(s.blocks) for s in stacks]
    if checkpointing:  # wrapped exactly as training wraps them, unwrapped afterwards
        apply_activation_checkpointing(model)
    model.train()

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(*inputs)

    try:
        return count_saved_bytes(model, run)
    finally:
        for s, blocks in zip(stacks, before):
            for i, block in enumerate(blocks):
                s.blocks[i] = block


@attrs.frozen
class ActivationProfile:
    """Saved bytes of a forward: ``fixed + rows * per_sequence``, without and with checkpointing."""

    per_sequence: int
    fixed: int  # independent of the rows: mostly the autocast bf16 copies of the weights
    per_sequence_checkpointed: int  # the checkpointed blocks' inputs and what lies outside blocks
    fixed_checkpointed: int
    block_peak: int  # per sequence: the largest block's saved bytes, live again while it is recomputed

    def saved(self, rows: int, checkpointing: bool) -> int:
        """Bytes saved for backward by a forward of ``rows`` sequences."""
        if checkpointing:
            return self.fixed_checkpointed + rows * self.per_sequence_checkpointed
        return self.fixed + rows * self.per_sequence

    def per_row(self, checkpointing: bool) -> int:
        """Peak activation bytes per sequence (with checkpointing: plus one block recomputed)."""
        return self.per_sequence_checkpointed + self.block_peak if checkpointing else self.per_sequence


@contextmanager
def _fake_mode():
    with FakeTensorMode():
        yield


_PROFILES: dict[str, ActivationProfile] = {}


def measure_activations(model_spec, autocast: bool = True) -> ActivationProfile:
    """The profile of ``model_spec`` (a ModelSpec) under bfloat16 autocast (or float32), measured on a
    fake model: nothing is allocated. Remembered per process by the spec's content."""
    key = json.dumps([unstructure(model_spec), autocast], sort_keys=True, default=str)
    if key not in _PROFILES:
        try:
            _PROFILES[key] = _measure(model_spec, autocast)
        except Exception as exc:  # noqa: BLE001 - e.g. a plugin component that reads tensor values
            raise MeasurementError(
                f"the planner could not run the model on fake tensors ({type(exc).__name__}: {exc}); set "
                f"training.micro_batch_size and training.activation_checkpointing explicitly"
            ) from exc
    return _PROFILES[key]


def _measure(model_spec, autocast: bool) -> ActivationProfile:
    with _fake_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast's dtype notices, once per op kind: not the user's concern
        model = build_model(model_spec)
        runs = {}
        for ckpt in (False, True):
            for rows in (1, 2):
                inputs = example_inputs(model, rows, model_spec.seq_len)
                runs[ckpt, rows] = saved_by_forward(model, inputs, ckpt, autocast)
    blocks = {name: len(m.blocks) for name, m in model.named_modules() if isinstance(m, Stack)}
    one, two = runs[False, 1], runs[False, 2]
    block_peak = max(
        ((two.by_stack.get(n, 0) - one.by_stack.get(n, 0)) // k for n, k in blocks.items() if k), default=0
    )
    per = two.total - one.total
    per_ck = runs[True, 2].total - runs[True, 1].total
    return ActivationProfile(per, one.total - per, per_ck, runs[True, 1].total - per_ck, block_peak)
