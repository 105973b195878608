"""Weights for a model built on the meta device: each rank allocates only its shards and fills them.

Training builds the model on the meta device (no storage), applies parallelism to it
(:mod:`unetlm.train.parallelize`), then calls :func:`materialize`: ``to_empty`` gives each rank
storage for its own shards only, and every module is initialised by the model's own rule
(``UNet.init_module``) on full-size temporaries of the parameters it holds itself, from one
seeded generator in module order, each rank keeping its slice. The weights are therefore the same
whatever the number of processes or the sharding, and no rank ever holds more than its shards plus
one module's parameters.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    """Allocate ``model``'s parameters on ``device`` and initialise them, identically for any sharding."""
    model.to_empty(device=device)
    torch.manual_seed(seed)
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        sharded = {name: p for name, p in own.items() if isinstance(p, DTensor)}
        if not sharded:
            model.init_module(module)
            continue
        full = {name: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device)) for name, p in sharded.items()}
        module._parameters.update(full)  # the module's init sees whole tensors
        try:
            model.init_module(module)
        finally:
            module._parameters.update(sharded)
        for name, p in sharded.items():
            mine = distribute_tensor(full[name].detach(), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(mine.to_local())
    return model
