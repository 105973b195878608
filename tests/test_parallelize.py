"""Parallelism applied from outside the model: FSDP2 units, mixed precision, HSDP mesh checks."""
from __future__ import annotations

import attrs
import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

import unetlm
from test_train import tiny_recipe_dict
from unetlm.recipe import recipe_from_dict
from unetlm.train.errors import TrainingError
from unetlm.train.parallel import World
from unetlm.train.parallelize import parallelize, plan_parallelism

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
    plan = attrs.evolve(plan_parallelism(recipe.training, world, True, False, torch.bfloat16), shard=True,
                         param_dtype=torch.bfloat16)
    parallelize(model, plan, world)
    units = {name for name, m in model.named_modules() if isinstance(m, FSDPModule)}
    blocks = {name for name in units if ".blocks." in name}
    assert blocks == {"encoders.0.blocks.0", "middle.blocks.0", "decoders.0.blocks.0"}
    assert units - blocks == {"", "embed", "embed.hashed.0", "embed.hashed.1", "head"}
    assert "activation checkpointing" in plan.describe() and "bfloat16 parameters" in plan.describe()
    tokens = torch.randint(0, 256, (1, 64))
    out = model(tokens, targets=tokens.roll(-1, 1))  # blocks compute with bfloat16 parameters
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())  # fp32 sharded params and grads


def test_shard_size_must_divide_the_world():
    spec = recipe_from_dict(tiny_recipe_dict("unused", shard_size=3)).training
    with pytest.raises(TrainingError, match="training.shard_size = 3 is invalid: it must divide the 4 processes"):
        plan_parallelism(spec, World(0, 4, 0, CPU), False, False, None)
    plan = plan_parallelism(attrs.evolve(spec, shard_size=2), World(0, 4, 0, CPU), False, False, None)
    assert plan.replicas == 2 and "HSDP (2 replicas x 2 shards)" in plan.describe()


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
    plan = attrs.evolve(plan_parallelism(recipe.training, world, True, True, None), shard=True)
    assert plan.describe() == "FSDP2, activation checkpointing, compiled blocks and transitions"
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
            with pytest.raises(RunError, match="a compiled region needed more graphs than the 1 it may hold") if rows == 2 else _nothing():
                model(tokens, doc, model.split(tokens, doc))


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def test_planner_units_are_the_units_fully_shard_wraps(one_rank_group):
    """The planner's FSDP2 layout of tiny BLT (hash-embedding tables, untied head) lists the modules
    fully_shard wraps, each with the parameters its unit shards and whether it is resharded."""
    from entropy_example import with_example_checkpoint

    from unetlm.recipe import load_recipe
    from unetlm.train.plan import parameter_layout

    recipe = with_example_checkpoint(load_recipe("recipes/tiny/blt.toml"))
    model = unetlm.build_model(recipe)
    layout = parameter_layout(model)
    world = World(0, 1, 0, CPU)
    plan = attrs.evolve(plan_parallelism(recipe.training, world, False, False, None), shard=True)
    parallelize(model, plan, world)
    wrapped = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            count = sum(p._orig_size.numel() for p in group.fsdp_params) if group else 0
            wrapped[name] = (count, group is None or group.post_forward_mesh_info is not None)
    assert {u.name: (u.params, u.resharded) for u in layout.units} == wrapped
    tables = [f"embed.hashed.{i}" for i in range(6)]
    assert set(tables) | {"embed", "head", ""} <= set(wrapped) and layout.units[-1].name == ""
    assert all(wrapped[t] == (4096 * 64, True) for t in tables)  # the tables are not in the root
    assert layout.held == wrapped[""][0] + wrapped["head"][0] and not wrapped["head"][1]
    assert layout.total == sum(p.numel() for p in model.parameters())
