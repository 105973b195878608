"""Two CPU processes under torchrun (gloo): FSDP2 + compiled, checkpointed blocks + micro-batches
train like one eager process, and their sharded checkpoint resumes on two processes and on one; a
start builds only each rank's shards, with the weights and gradients of one process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unetlm
from test_train import losses, saved, tiny_recipe, tiny_recipe_dict, weights, write_corpus
from unetlm.recipe import dump_recipe
from unetlm.train import loop

# dynamo and AOTAutograd as in real training, without inductor's slow C++ code generation
BACKEND = ">=0:aot_eager"
PARALLEL = dict(threads=1, steps=4, eval_every=2, checkpoint_every=2)
COMPILED = dict(PARALLEL, compile=True, activation_checkpointing=True, micro_batch_size=1, async_checkpoint=True)


def torchrun(args: list[str], cwd, program: tuple[str, ...] = ("-m", "unetlm.cli")) -> subprocess.CompletedProcess:
    root = str(Path(unetlm.__file__).resolve().parents[1])  # the processes import the unetlm under test
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_COMPILE_OVERRIDE_BACKENDS": BACKEND,
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *program, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = write_corpus(root / "corpus")
    loop.train(tiny_recipe(corpus, **PARALLEL), root / "eager", progress=False, sample=False)  # uninterrupted
    recipe_file = root / "tiny.toml"  # two processes of 2 rows each, 1 row per forward: gradients accumulate
    recipe_file.write_text(dump_recipe(tiny_recipe(corpus, **COMPILED)), encoding="utf-8")
    first = torchrun(["train", str(recipe_file), "--out", str(root / "two"), "--quiet", "--stop-at", "2"], root)
    assert first.returncode == 0, first.stderr[-3000:]
    assert saved(root / "two")["step"] == 2 and saved(root / "two")["world_size"] == 2
    shutil.copytree(root / "two", root / "two-then-one")
    # resumed on two processes as HSDP (2 replicas of 1 shard) from shards written by plain FSDP2
    hsdp = ["--set", "training.shard_size=1", "--force"]
    again = torchrun(["train", str(recipe_file), "--out", str(root / "two"), "--quiet", "--resume", *hsdp], root)
    assert again.returncode == 0, again.stderr[-3000:]
    with torch._dynamo.config.patch(debug_backend_override=BACKEND):  # torch's own patch restores it whole
        loop.train(tiny_recipe(corpus, **COMPILED), root / "two-then-one", resume=True, progress=False, sample=False)
    return root


def test_sharded_compiled_run_resumed_on_two_and_on_one_equals_uninterrupted(runs):
    want = losses(runs / "eager")
    assert sorted(want) == [1, 2, 3, 4]
    for name in ("two", "two-then-one"):
        got = losses(runs / name)
        assert sorted(got) == [1, 2, 3, 4], name
        for step in want:
            assert got[step] == pytest.approx(want[step], abs=1e-4), (name, step)
    a, b, c = weights(runs / "eager"), weights(runs / "two"), weights(runs / "two-then-one")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4) and torch.allclose(a[key], c[key], atol=1e-4), key
    shards = sorted(p.name for p in (runs / "two" / "checkpoint").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own


def test_recipe_error_is_reported_once(tmp_path):
    bad = tiny_recipe_dict("x")
    bad["training"]["lr"] = "fast"
    import tomli_w

    (tmp_path / "bad.toml").write_text(tomli_w.dumps(bad), encoding="utf-8")
    done = torchrun(["train", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "run")], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("training.lr = 'fast' is invalid") == 1


def test_start_shards_only_with_the_weights_and_gradients_of_one_process(tmp_path):
    """Two processes set up a ~250M-parameter run each below the model's fp32 size (no rank builds the
    whole model), start from the weights one process starts from, and on rows padded unevenly across
    ranks and micro-batches compute the one-process gradient (as FSDP2 and as HSDP): the loss is
    normalised by the step's global target count."""
    import start_worker
    from test_train import tiny_recipe_dict

    corpus = write_corpus(tmp_path / "corpus")
    tiny = tmp_path / "tiny.toml"  # 4 rows per rank in micro-batches of 2
    tiny.write_text(dump_recipe(tiny_recipe(corpus, batch_size=8, micro_batch_size=2, threads=1)), encoding="utf-8")
    big = tiny_recipe_dict(corpus, batch_size=2, threads=1)
    big["model"]["stages"][0]["dim"] = 256
    big["model"]["stages"][1].update(dim=1024, layers=20, mixer={"name": "attention", "head_dim": 64})
    from unetlm.recipe import recipe_from_dict

    with torch.device("meta"):
        fp32_bytes = 4 * sum(p.numel() for p in unetlm.build_model(recipe_from_dict(big)).parameters())
    assert 200e6 < fp32_bytes / 4 < 300e6
    big_file = tmp_path / "big.toml"
    big_file.write_text(dump_recipe(recipe_from_dict(big)), encoding="utf-8")
    worker = str(Path(start_worker.__file__))
    done = torchrun([str(tmp_path), str(tiny), str(big_file)], tmp_path, program=(worker,))
    assert done.returncode == 0, done.stderr[-3000:]
    start_worker.main(tmp_path, tiny)  # one process, here
    one, two = (torch.load(tmp_path / f"start-{n}.pt", weights_only=True) for n in (1, 2))
    assert len(two["peak_rss"]) == 2 and all(peak < fp32_bytes for peak in two["peak_rss"]), (two["peak_rss"], fp32_bytes)
    want = one["fsdp"]
    for layout in ("fsdp", "hsdp"):  # sharded over both ranks; 2 replicas, all-reduced in the last micro-batch
        got = two[layout]
        assert want["weights"].keys() == got["weights"].keys()
        for key, value in want["weights"].items():
            assert torch.equal(value, got["weights"][key]), (layout, key)
        assert want["grads"].keys() == got["grads"].keys() and len(want["grads"]) == len(want["weights"])
        for key, grad in want["grads"].items():
            assert torch.allclose(grad, got["grads"][key], rtol=1e-4, atol=1e-7), (layout, key)
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
