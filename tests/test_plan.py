"""The memory planner: fake-tensor activations equal real saved bytes; train runs the plan's choice;
the global batch is the process count's master, not its servant; `unetlm plan` refuses what cannot fit."""
from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import torch

from unetlm.api import build_model
from unetlm.cli import main
from unetlm.recipe import load_recipe
from unetlm.train import activations, hardware, loop, plan
from unetlm.train.errors import TrainingError
from unetlm.train.parallelize import mixer_stacks
from unetlm.train.scaling import check_resumed_batch, round_batch, split_batch

TINY = sorted(Path("recipes/tiny").glob("*.toml"))
TEXT = b"The byte model reads words, pools them; then it returns. " * 40


def shortened(path: Path, factor: int = 4):
    """A tiny recipe with every stage ``factor`` times shorter: the same components, cheaper forwards."""
    recipe = load_recipe(path)
    lengths = [-(-s.max_len // factor) for s in recipe.model.stages]
    overrides = [f"model.seq_len={lengths[0]}"] + [f"model.stages[{i}].max_len={n}" for i, n in enumerate(lengths)]
    return load_recipe(path, overrides)


def real_inputs(model, rows: int, seq_len: int) -> tuple:
    tokens = torch.tensor(list(TEXT[: rows * seq_len]), dtype=torch.long).view(rows, seq_len)
    doc = torch.zeros_like(tokens)
    doc[:, seq_len // 2 :] = 1  # two documents per row
    masks = [tokens == ord(" ") for _ in model.splitters]  # word boundaries; any mask has the same shapes
    return tokens, doc, masks, tokens.roll(-1, 1)


@pytest.mark.slow
def test_planned_activations_equal_the_bytes_saved_for_backward():
    """For every tiny recipe, fake-tensor measurement at 1 and 2 rows extrapolated to 3 rows equals
    the storages real CPU tensors save for backward under bf16 autocast, within 10%."""
    assert len(TINY) >= 10
    for path in TINY:
        recipe = shortened(path)
        profile = activations.measure_activations(recipe.model)
        torch.manual_seed(0)
        model = build_model(recipe)
        inputs = real_inputs(model, 3, recipe.model.seq_len)
        for ckpt in (False, True):
            real = activations.saved_by_forward(model, inputs, ckpt).total
            predicted = profile.saved(3, ckpt)
            assert real > 0
            assert abs(predicted - real) <= 0.1 * real, (path.name, ckpt, predicted, real)
        assert profile.per_sequence_checkpointed < profile.per_sequence, path.name
        assert 0 < profile.block_peak < profile.per_sequence, path.name


def test_train_runs_the_planned_micro_batch_and_checkpointing(tmp_path, monkeypatch):
    corpus = tmp_path / "doc.txt"
    corpus.write_bytes(TEXT * 4)
    recipe = load_recipe(
        "recipes/tiny/au2.toml",
        [
            'data.source="files"', f'data.paths=["{corpus}"]', "training.steps=1", "training.batch_size=8",
            'training.micro_batch_size="auto"', 'training.activation_checkpointing="auto"', "training.eval_batches=1",
            "training.sample_bytes=0", 'training.device="cpu"', "training.compile=false",
        ],
    )
    with torch.device("meta"):
        units = plan.unit_sizes(build_model(recipe))
    profile = activations.measure_activations(recipe.model, autocast=False)  # a CPU trains in float32 by default
    static = plan.Plan(hardware.Hardware(1, 1 << 40, None), units, profile, 8, 512, 1.0, False, 1, 8).static
    # room for 2.5 sequences without checkpointing: the planner must pick 2 (a divisor of 8), no checkpointing
    host = hardware.Hardware(1, int((static + 2.5 * profile.per_row(False)) / hardware.USABLE_FRACTION), None)
    monkeypatch.setattr(hardware, "host_hardware", lambda processes: host)
    used = {}
    real_forward_backward = loop.forward_backward

    def spy(model, batch, micro_rows, *args):
        used["micro"] = micro_rows
        used["checkpointing"] = {  # parallelize wraps every mixer block when checkpointing
            hasattr(b, "_checkpoint_wrapped_module") for s in mixer_stacks(model) for b in s.blocks
        }
        return real_forward_backward(model, batch, micro_rows, *args)

    monkeypatch.setattr(loop, "forward_backward", spy)
    loop.train(recipe, tmp_path / "run", progress=False, sample=False)
    assert used == {"micro": 2, "checkpointing": {False}}
    # less room than one sequence without checkpointing: checkpointing on, and what fits with it
    tight = attrs.evolve(host, memory=int((static + 1.5 * profile.per_row(True)) / hardware.USABLE_FRACTION))
    monkeypatch.setattr(hardware, "host_hardware", lambda processes: tight)
    chosen = plan.choose_plan(tight, units, profile, 8, 512, 1.0)
    assert (chosen.checkpointing, chosen.micro_batch, chosen.accumulation) == (True, 1, 8)
    loop.train(recipe, tmp_path / "run2", progress=False, sample=False)
    assert used == {"micro": 1, "checkpointing": {True}}
    # too little memory even with checkpointing: refused with the numbers, before a step runs
    monkeypatch.setattr(hardware, "host_hardware", lambda processes: attrs.evolve(host, memory=static))
    with pytest.raises(TrainingError, match="do not fit in .* GiB before activations.*Change:"):
        loop.train(recipe, tmp_path / "run3", progress=False, sample=False)
    assert not (tmp_path / "run3").exists()
    # a resume that would change the global batch is refused, naming the stored one
    bigger = attrs.evolve(recipe, training=attrs.evolve(recipe.training, batch_size=16, steps=2))
    with pytest.raises(TrainingError, match="global batch of 8 sequences"):
        loop.train(bigger, tmp_path / "run2", resume=True, force=True, progress=False, sample=False)


def test_global_batch_never_depends_on_the_process_count():
    assert [round_batch(x) for x in (0.2, 3, 5.9, 47, 100, 223)] == [1, 2, 4, 32, 128, 192]  # ties round down
    split = split_batch(256, 8, 4)
    assert (split.micro_batch, split.accumulation, split.processes * split.local_rows) == (4, 8, 256)
    assert split_batch(256, 64).accumulation == 1
    with pytest.raises(ValueError, match="does not split over 64 processes.*e.g. 192 or 256"):
        split_batch(224, 64)
    with pytest.raises(ValueError, match="micro_batch_size = 3 does not divide the 4 sequences"):
        split_batch(8, 2, 3)
    check_resumed_batch(None, 32)  # a checkpoint from before the batch was stored
    with pytest.raises(ValueError, match="training.batch_size = 16"):
        check_resumed_batch(16, 32)


def test_plan_command_prints_the_plan_and_refuses_what_cannot_fit(capsys):
    assert main(["plan", "recipes/tiny/au2.toml", "--gpus", "2", "--set", 'training.micro_batch_size="auto"']) == 0
    out = capsys.readouterr().out
    for needle in ("FSDP2 over 2", "optimizer state", "activations per sequence", "communication per step", "MFU"):
        assert needle in out
    assert main(["plan", "recipes/tiny/au2.toml", "--gpus", "1", "--gpu-memory", "1GiB", "--set", "training.batch_size=512"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("unetlm: error: au2 on 1 x 1GiB: 512 sequences per GPU") and "Change:" in err
    assert err.count("\n") == 1
    assert main(["plan", "recipes/tiny/au2.toml", "--gpus", "1", "--gpu-memory", "lots"]) == 2
    assert main(["plan", "recipes/tiny/au2.toml", "--gpus", "3"]) == 2
    assert "training.batch_size = 8 does not split over 3 processes" in capsys.readouterr().err
    assert hardware.parse_memory("80GiB") == 80 * 2**30 and hardware.parse_memory("141 GB") == 141 * 10**9


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_figures(tmp_path, capsys):
    """The GPU check's dry mode: the real trainer over a one-rank gloo group (FSDP2, bf16 parameters,
    checkpointing, the planned micro-batch), evaluated and checkpointed in the background."""
    from unetlm.bench.gpu_check import main as gpu_check

    out = tmp_path / "gpu-check.json"
    only = "train_au4,flex_vs_sdpa,mamba_vs_mamba_ssm"
    assert gpu_check(["--dry-run", "--steps", "2", "--json", str(out), "--only", only]) == 0
    report = json.loads(out.read_text())
    checks = report["checks"]
    assert report["dry_run"] and set(checks) == set(only.split(","))
    train = checks["train_au4"]
    assert train["status"] == "ok" and len(train["losses"]) == 2 and train["checkpoint_step"] == 2
    assert train["planned_bytes"] > 0 and train["val_bpb"] > 0 and train["graph_breaks"] == 0
    assert train["parallelism"].startswith("FSDP2, bfloat16 parameters, float32 reduction, activation checkpointing")
    assert train["micro_batch"] * train["accumulation"] == train["batch"]
    assert checks["flex_vs_sdpa"]["eager_max_abs_diff"] < 1e-3
    assert checks["mamba_vs_mamba_ssm"]["status"] == "skipped"
    printed = capsys.readouterr().out
    assert "skipped: needs CUDA" in printed and '"train_au4": "ok"' in printed
    assert gpu_check(["--dry-run", "--only", "train_au5"]) == 2


def test_plan_arithmetic_and_the_refusal_names_what_would_fit():
    gib = 2**30
    blocks = tuple(plan.UnitSize(f"b{i}", 10**7, True) for i in range(98))
    units = plan.UnitSizes(blocks + (plan.UnitSize("head", 10**7, False), plan.UnitSize("", 10**7, False)))
    assert (units.total, units.held, units.in_flight, units.reducing) == (10**9, 2 * 10**7, 2 * 10**7, 2 * 10**7)
    profile = activations.ActivationProfile(gib, 0, gib // 10, 0, gib // 20)
    eight = hardware.Hardware(8, 80 * gib, 1e15)
    chosen = plan.choose_plan(eight, units, profile, 64, 1024, 1e13)
    assert (chosen.checkpointing, chosen.micro_batch, chosen.accumulation, chosen.shard_size) == (False, 8, 1, 8)
    assert chosen.optimizer == 8 * 10**9 // 8 and chosen.parameters == chosen.gradients == 4 * 10**9 // 8
    # bf16 gathers for the forward and (head, root held) the backward; fp32 reduce-scatter; no replicas
    assert chosen.gathered == pytest.approx(7 / 8 * 2 * (2 * 10**9 - 2 * 10**7))
    assert chosen.reduce_scattered == pytest.approx(7 / 8 * 4 * 10**9) and chosen.all_reduced == 0
    # gathered: head, root, two blocks; unsharded gradients: root + one unit; one unit's reduce-scatter input
    assert chosen.buffers == 2 * 4 * 10**7 + 2 * 2 * 10**7 + 4 * 10**7
    timing = chosen.timing()
    nvlink = 450e9 * hardware.COLLECTIVE_EFFICIENCY
    assert timing.shard_link == "NVLink" and timing.shard_bandwidth == nvlink
    assert timing.compute == pytest.approx(8 * 1e13 / (1e15 * plan.KERNEL_EFFICIENCY))
    # compute-bound: only the first gather (held units + a block) and the root's reduce-scatter show
    assert timing.exposed == pytest.approx(7 / 8 * (2 * 3 * 10**7 + 4 * 10**7) / nvlink)
    assert timing.optimizer == pytest.approx(10**9 / 8 * plan.OPTIMIZER_BYTES_PER_PARAMETER / 3.35e12)
    assert chosen.mfu == pytest.approx(8 * 1e13 / 1e15 / timing.total) and 0.45 < chosen.mfu < plan.KERNEL_EFFICIENCY
    fixed = plan.choose_plan(eight, units, profile, 64, 1024, 1e13, micro_batch=2, checkpointing=True)
    assert (fixed.micro_batch, fixed.accumulation, fixed.checkpointing) == (2, 4, True)
    assert fixed.buffers == chosen.buffers  # gradients are reduce-scattered per micro-batch, never held whole
    assert fixed.gathered == pytest.approx(4 * chosen.gathered) and fixed.timing().compute == pytest.approx(
        4 / 3 * timing.compute)  # the recomputed forward
    one = hardware.Hardware(1, 10 * gib, None)  # 16 GB of weights and AdamW state: not on 1 GPU
    with pytest.raises(plan.PlanError, match=r"Change: at least 2 GPUs, or a shorter model.seq_len or a smaller"):
        plan.choose_plan(one, units, profile, 8, 1024, 1e13)
    with pytest.raises(plan.PlanError, match=r"Change: at least 2 GPUs, or training.activation_checkpointing = true,"):
        plan.choose_plan(one, units, profile, 8, 1024, 1e13, micro_batch=1, checkpointing=False)


@pytest.mark.parametrize("gpus, shard_size", [(8, 0), (64, 8)])
def test_what_cannot_overlap_is_counted_once(gpus, shard_size):
    """A model that is its root alone: its gathers come before any compute and its reductions after
    the backward, so the communication not hidden is all of it, once (compute too short to matter)."""
    gib = 2**30
    units = plan.UnitSizes((plan.UnitSize("", 10**9, False),))
    profile = activations.ActivationProfile(gib, 0, gib // 10, 0, gib // 20)
    chosen = plan.choose_plan(hardware.Hardware(gpus, 80 * gib, 1e15), units, profile, gpus, 1024, 1e11,
                              micro_batch=1, checkpointing=False, shard_size=shard_size)
    t = chosen.timing()
    expected = (chosen.gathered + chosen.reduce_scattered) / t.shard_bandwidth + chosen.all_reduced / t.replica_bandwidth
    assert t.exposed == pytest.approx(expected)


def test_hsdp_shards_within_a_node_and_all_reduces_across_nodes():
    """64 GPUs in nodes of 8: sharding within a node keeps the gathers on NVLink and sends one
    all-reduce of the shard over InfiniBand; "auto" picks the fastest layout that fits."""
    gib = 2**30
    units = plan.UnitSizes(tuple(plan.UnitSize(f"b{i}", 5 * 10**7, True) for i in range(99))
                            + (plan.UnitSize("", 5 * 10**7, False),))
    profile = activations.ActivationProfile(gib, 0, gib // 10, 0, gib // 20)
    cluster = hardware.Hardware(64, 80 * gib, 1e15)
    options = dict(micro_batch=0, checkpointing=False)
    flat = plan.choose_plan(cluster, units, profile, 128, 1024, 1e13, shard_size=0, **options)
    node = plan.choose_plan(cluster, units, profile, 128, 1024, 1e13, shard_size=8, **options)
    assert (flat.replicas, node.replicas) == (1, 8)
    assert flat.timing().shard_link == "InfiniBand"
    t = node.timing()
    assert (t.shard_link, t.replica_link) == ("NVLink", "InfiniBand")
    assert node.parameters == 8 * flat.parameters and node.local == 5 * 10**9 // 8
    assert node.all_reduced == pytest.approx(2 * 4 * node.local * 7 / 8)  # a ring all-reduce of the fp32 shard
    assert node.mfu > 2 * flat.mfu
    bf16 = plan.choose_plan(cluster, units, profile, 128, 1024, 1e13, shard_size=8, reduce_bytes=2, **options)
    assert bf16.all_reduced == pytest.approx(node.all_reduced / 2) and bf16.step_time < node.step_time
    # several micro-batches under HSDP: the reduce-scattered gradients are summed until the last all-reduce
    split = plan.choose_plan(cluster, units, profile, 128, 1024, 1e13, shard_size=8, micro_batch=1,
                             checkpointing=False)
    assert split.accumulation == 2 and split.buffers == node.buffers + 4 * node.local
    auto = plan.choose_plan(cluster, units, profile, 128, 1024, 1e13, shard_size="auto", **options)
    times = {s: t for s, _, t in auto.considered}
    assert sorted(times) == plan.divisors(64) and auto.considered[0] == (1, False, None)  # 80 GB of state on one GPU
    assert all(fits == (t is not None) for _, fits, t in auto.considered)
    assert auto.shard_size == min((s for s in times if times[s] is not None), key=times.get) == 8
    assert auto.step_time == times[8]
    untimed = plan.choose_plan(attrs.evolve(cluster, peak_flops=None), units, profile, 128, 1024, 1e13,
                               shard_size="auto", **options)  # without a time estimate: the least communication
    assert untimed.step_time is None and "1: does not fit, 2: fits" in plan.describe(untimed)
    assert untimed.communication == min(attrs.evolve(untimed, shard_size=s).communication for s in times if s > 1)
    text = plan.describe(auto, "x")
    assert "HSDP: 8 replicas x 8 shards" in text and 'shard_size "auto" chose 8' in text and "1: does not fit" in text
    with pytest.raises(ValueError, match="training.shard_size = 3 is invalid: it must divide the 64 processes"):
        plan.choose_plan(cluster, units, profile, 128, 1024, 1e13, shard_size=3)
    assert hardware.parse_bandwidth("400Gb/s", "--x") == 50e9 == hardware.parse_bandwidth("50GB/s", "--x")
    assert hardware.parse_bandwidth("3.35TB/s", "--x") == pytest.approx(3.35e12)
    with pytest.raises(ValueError, match="--inter-node-bandwidth '-5GB/s' is invalid: expected a positive rate"):
        hardware.parse_bandwidth("-5GB/s", "--inter-node-bandwidth")


def test_resolution_decides_every_auto_value_as_a_pure_function():
    """A run resolved for 16 hypothetical GPUs in nodes of 8: every training "auto" decided once, in
    one place, from the plan; the recipe as written kept for the run directory."""
    import torch

    from unetlm.train.distributed import World
    from unetlm.train.resolve import resolve_run

    autos = ['training.micro_batch_size="auto"', 'training.activation_checkpointing="auto"',
             'training.shard_size="auto"', "training.batch_size=32", 'training.lr="auto"']
    recipe = load_recipe("recipes/tiny/au2.toml", autos)
    cluster = hardware.Hardware(16, 2**28, 989e12, gpus_per_node=8)
    world = World(0, 16, 0, torch.device("cuda"))  # planned for, not run on
    run = resolve_run(recipe, world, hardware=cluster)
    assert run == resolve_run(recipe, world, hardware=cluster)  # a pure function of its inputs
    assert run.given is recipe and recipe.training.shard_size == "auto"
    spec, p = run.training, run.plan
    assert "auto" not in (spec.batch_size, spec.lr, spec.micro_batch_size, spec.activation_checkpointing,
                          spec.shard_size, spec.dtype, spec.compile, spec.async_checkpoint)
    assert (spec.micro_batch_size, spec.activation_checkpointing, spec.shard_size) == (
        p.micro_batch, p.checkpointing, p.shard_size)
    assert (run.split.micro_batch, run.split.accumulation) == (p.micro_batch, p.accumulation)
    assert run.parallelism.shard and run.parallelism.shard_size == p.shard_size
    assert run.parallelism.param_dtype == torch.bfloat16 and spec.dtype == "bfloat16" and spec.compile
    assert spec.lr == run.budget.lr and (p.shard_size, True, p.step_time) in p.considered
    assert 'shard_size "auto" chose' in run.describe()
