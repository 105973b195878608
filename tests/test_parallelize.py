"""Parallelism applied from outside the model: FSDP2 units, mixed precision, HSDP mesh checks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

import unetlm
from test_train import tiny_recipe_dict
from unetlm.recipe import recipe_from_dict
from unetlm.train.distributed import World
from unetlm.train.parallelize import Parallelism, parallelize
from unetlm.train.resolve import resolve_run

CPU = torch.device("cpu")


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank, so fully_shard runs inside the test process."""
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_units_and_mixed_precision(one_rank_group):
    data = tiny_recipe_dict("unused", activation_checkpointing=True)
    data["model"]["embedding"] = {"hash_ngrams": [3, 4], "hash_buckets": 64}
    recipe = recipe_from_dict(data)
    model = unetlm.build_model(recipe)
    world = World(0, 1, 0, CPU)
    parallelism = Parallelism(checkpointing=True, compile=False, shard=True, param_dtype=torch.bfloat16)
    parallelize(model, parallelism, world)
    units = {name for name, m in model.named_modules() if isinstance(m, FSDPModule)}
    blocks = {name for name in units if ".blocks." in name}
    assert blocks == {"encoders.0.blocks.0", "middle.blocks.0", "decoders.0.blocks.0"}
    assert units - blocks == {"", "embed", "embed.hashed.0", "embed.hashed.1", "head"}
    described = parallelism.describe()
    assert "activation checkpointing" in described and "bfloat16 parameters, float32 reduction" in described
    tokens = torch.randint(0, 256, (1, 64))
    out = model(tokens, targets=tokens.roll(-1, 1))  # blocks compute with bfloat16 parameters
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # fp32 sharded params and grads


def test_shard_size_must_divide_the_world():
    recipe = recipe_from_dict(tiny_recipe_dict("unused", shard_size=3))
    with pytest.raises(ValueError, match="training.shard_size = 3 is invalid: it must divide the 4 processes"):
        resolve_run(recipe, World(0, 4, 0, CPU))
    recipe = recipe_from_dict(tiny_recipe_dict("unused", shard_size=2, reduce_dtype="bfloat16"))
    parallelism = resolve_run(recipe, World(0, 4, 0, CPU)).parallelism
    assert (parallelism.replicas, parallelism.reduce_dtype) == (2, torch.bfloat16)
    assert "HSDP (2 replicas x 2 shards), bfloat16 reduction" in parallelism.describe()


def test_compiled_regions_hold_no_fsdp_hooks(one_rank_group):
    """Under FSDP2 (hash-embedding tables and the head units of their own) every region compiles
    without a graph break; in one process the whole forward is the one region."""
    from torch._dynamo.utils import counters

    from unetlm.train.parallelize import compile_regions

    data = tiny_recipe_dict("unused")
    data["model"]["embedding"] = {"hash_ngrams": [3], "hash_buckets": 64}
    recipe = recipe_from_dict(data)
    blocks = ["encoders.0.blocks.0", "middle.blocks.0", "decoders.0.blocks.0"]
    assert compile_regions(unetlm.build_model(recipe), sharded=False) == ["model"]
    model = unetlm.build_model(recipe)
    world = World(0, 1, 0, CPU)
    plan = Parallelism(checkpointing=True, compile=True, shard=True)
    assert plan.describe() == "FSDP2, float32 reduction, activation checkpointing, compiled blocks and transitions"
    tokens = torch.randint(0, 256, (2, 64))
    doc = torch.zeros_like(tokens)
    masks = model.split(tokens, doc)
    with torch._dynamo.config.patch(debug_backend_override=">=0:aot_eager"):
        torch._dynamo.reset()
        counters.clear()
        parallelize(model, plan, world)
        model(tokens, doc, masks, tokens.roll(-1, 1)).loss.backward()
    assert compile_regions(unetlm.build_model(recipe), sharded=True) == blocks + ["down()", "up()"]
    assert counters["stats"]["unique_graphs"] == 4 and not counters["graph_break"]  # 2 block shapes, down, up
    assert all(p.grad is not None for p in model.parameters())


def test_a_region_past_its_graphs_stops_the_run(monkeypatch):
    """Room for the first batch shape only: the second shape is an error, not an eager fall back."""
    from unetlm.core.errors import RunError
    from unetlm.train import parallelize as P

    data = tiny_recipe_dict("unused")
    data["model"]["stages"] = data["model"]["stages"][:1]
    model = unetlm.build_model(recipe_from_dict(data))
    monkeypatch.setattr(P, "GRAPHS_PER_REGION", 0)
    with torch._dynamo.config.patch(debug_backend_override=">=0:aot_eager", recompile_limit=1):
        torch._dynamo.reset()
        P.compile_regions(model, sharded=False)
        for rows in (1, 2):
            tokens = torch.randint(0, 256, (rows, 16))
            doc = torch.zeros_like(tokens)
            if rows == 1:
                model(tokens, doc, model.split(tokens, doc))
                continue
            with pytest.raises(RunError, match="a compiled region needed more graphs than the 1 it may hold"):
                model(tokens, doc, model.split(tokens, doc))


def test_planner_units_are_the_units_fully_shard_wraps(one_rank_group):
    """The planner's FSDP2 layout of tiny BLT (hash-embedding tables, untied head) lists the modules
    fully_shard wraps, each with the parameters its unit shards and whether it is resharded."""
    from entropy_example import with_example_checkpoint

    from unetlm.recipe import load_recipe
    from unetlm.train.plan import unit_sizes

    recipe = with_example_checkpoint(load_recipe("recipes/tiny/blt.toml"))
    model = unetlm.build_model(recipe)
    sizes = unit_sizes(model)
    world = World(0, 1, 0, CPU)
    parallelize(model, Parallelism(checkpointing=False, compile=False, shard=True), world)
    wrapped = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            count = sum(p._orig_size.numel() for p in group.fsdp_params) if group else 0
            wrapped[name] = (count, group is None or group.post_forward_mesh_info is not None)
    assert {u.name: (u.params, u.resharded) for u in sizes.units} == wrapped
    tables = [f"embed.hashed.{i}" for i in range(6)]
    assert set(tables) | {"embed", "head", ""} <= set(wrapped) and sizes.units[-1].name == ""
    assert all(wrapped[t] == (4096 * 64, True) for t in tables)  # the tables are not in the root
    assert sizes.held == wrapped[""][0] + wrapped["head"][0] and not wrapped["head"][1]
    assert sizes.total == sum(p.numel() for p in model.parameters())


def test_initialisation_needs_every_holder_of_parameters_to_reset_them():
    """Training initialises a meta-device model module by module: a module that holds parameters or
    buffers itself without reset_parameters() is named, not left uninitialised."""
    from unetlm.train.materialize import materialize

    model = unetlm.build_model(recipe_from_dict(tiny_recipe_dict("unused")))

    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(1))

    with pytest.raises(TypeError, match="Scale holds parameters or buffers but has no reset_parameters"):
        model.init_module(Scale())
    with torch.device("meta"):
        meta = unetlm.build_model(recipe_from_dict(tiny_recipe_dict("unused")))
    materialize(meta, CPU, seed=0)
    for (name, built), made in zip(model.named_parameters(), meta.parameters()):
        assert made.device == CPU and made.shape == built.shape and torch.isfinite(made).all(), name
    assert torch.equal(meta.upsamplers[0].start, torch.zeros_like(meta.upsamplers[0].start))
    norms = [m.weight for m in meta.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)
