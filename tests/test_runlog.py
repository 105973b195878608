"""Seeing a run: per-interval records (step time, bytes/s, MFU, data wait), reductions only at log
steps, non-finite steps skipped on the device, TensorBoard and Weights & Biases sinks."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from test_train import corpus, tiny_recipe, weights  # noqa: F401
from unetlm.core.errors import RunError
from unetlm.recipe.schema import WandbSpec
from unetlm.train import loop, runlog
from unetlm.train.guard import FiniteGuard
from unetlm.train.metrics import read_metrics
from unetlm.train.distributed import World
from unetlm.train.progress import Progress

ONE = World(0, 1, 0, torch.device("cpu"))


@pytest.fixture(scope="module")
def every_step(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("every")
    loop.train(tiny_recipe(corpus, steps=4, eval_every=4, checkpoint_every=4), out, progress=False, sample=False)
    return out


def test_records_measure_the_interval_since_the_last_one(every_step, corpus, tmp_path):
    records = read_metrics(every_step / "metrics.jsonl")
    for r in records:
        assert r["step_time_s"] > 0 and r["data_wait_s"] >= 0 and r["bytes_per_s"] > 0
        assert r["bytes_per_s"] == pytest.approx(r["bytes_per_s_per_device"])  # one process
        assert r["bytes_per_s"] == pytest.approx(4 * 64 / r["step_time_s"], rel=1e-6)  # batch 4 x 64 bytes
        assert "mfu" not in r and "peak_memory_gib" not in r  # no known peak, no CUDA on a CPU
    loop.train(tiny_recipe(corpus, steps=4, eval_every=4, checkpoint_every=4, log_every=3), tmp_path,
               progress=False, sample=False)
    sparse = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    dense = {r["step"]: r for r in records}
    assert sorted(sparse) == [3, 4]  # every 3 steps, and the last
    assert sparse[3]["loss"] == pytest.approx(sum(dense[s]["loss"] for s in (1, 2, 3)) / 3, abs=1e-6)
    assert sparse[4]["loss"] == pytest.approx(dense[4]["loss"], abs=1e-6) and "val_bpb" in sparse[4]
    assert sparse[4]["grad_norm"] == pytest.approx(dense[4]["grad_norm"], abs=1e-6)
    a, b = weights(every_step), weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)  # how often a run records does not change it


def test_mfu_is_the_model_flops_over_the_devices_peak():
    logger = runlog.RunLogger(ONE, torch.ones(258), bytes_per_step=1000.0, flops_per_byte=5e6, peak_flops=1e12,
                              bar=Progress(10, enabled=False), metrics=None, board=None, wandb=None)
    logger.start()
    output = loop.StepOutput(torch.tensor(2.0), torch.tensor([10.0, 20.0], dtype=torch.float64), [torch.tensor(0)],
                             None, [], grad_norm=torch.tensor(1.0))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    for _ in range(2):
        logger.accumulate(output)
    record = logger.record(7, output, optimizer)
    assert record["loss"] == pytest.approx(2.0) and record["bpb"] == pytest.approx(0.5 / 0.6931471805599453)
    assert record["mfu"] == pytest.approx(1000.0 * 5e6 / record["step_time_s"] / 1e12)
    assert record["bytes"] == 7000.0 and record["truncated"] == [0]


def test_a_non_finite_step_and_every_later_one_leave_the_weights_alone():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    guard = FiniteGuard(optimizer, torch.device("cpu"), "run/checkpoint")
    history = []
    for step, loss in enumerate([1.0, float("nan"), 1.0], start=1):
        param.grad = torch.full((3,), loss)
        guard.observe(step, torch.tensor(loss), torch.linalg.vector_norm(param.grad))
        optimizer.step()
        history.append(param.detach().clone())
    assert not torch.equal(history[0], torch.ones(3))
    assert torch.equal(history[1], history[0]) and torch.equal(history[2], history[0])
    with pytest.raises(RunError, match=r"loss became nan at step 2; stopping \(no update was applied"):
        guard.check()


def test_tensorboard_and_wandb_receive_every_record_and_a_resume_continues_them(corpus, tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0, "board": [], "purge": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)

    class Board:
        def add_scalar(self, key, value, step):
            calls["board"].append((key, step))

        def close(self):
            pass

    monkeypatch.setattr(runlog, "open_tensorboard", lambda path, purge_step: calls["purge"].append(purge_step) or Board())
    recipe = tiny_recipe(corpus, steps=4, eval_every=2, checkpoint_every=2, tensorboard=True)
    recipe.training.wandb = WandbSpec(project="bytes", mode="offline")
    loop.train(recipe, tmp_path, progress=False, sample=False, stop_at=2)
    loop.train(recipe, tmp_path, progress=False, sample=False)
    first, again = calls["init"]
    assert first["project"] == "bytes" and first["mode"] == "offline" and first["resume"] == "allow"
    assert first["id"] == again["id"] == (tmp_path / "wandb-id").read_text().strip() and first["dir"] == str(tmp_path)
    assert [step for step, _ in calls["log"]] == [1, 2, 3, 4] and calls["finish"] == 2
    assert {"train/loss", "train/step_time_s", "train/bytes_per_s_per_device", "train/val_bpb"} <= set(
        calls["log"][1][1])
    assert calls["purge"] == [None, 3]  # the resumed run drops TensorBoard events from step 3 on
    assert ("train/data_wait_s", 4) in calls["board"] and ("train/val_bpb", 2) in calls["board"]


def test_wandb_offline_writes_a_run(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the optional extra wandb is not installed")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = tiny_recipe(corpus, steps=2, eval_every=2, checkpoint_every=2)
    recipe.training.wandb = WandbSpec(project="unetlm-test", mode="offline")
    loop.train(recipe, tmp_path, progress=False, sample=False, stop_at=1)
    loop.train(recipe, tmp_path, progress=False, sample=False)
    run_id = (tmp_path / "wandb-id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run, started twice
