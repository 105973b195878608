"""Training loop: resume equality, NaN stop, atomic checkpoints, recipe checks, budget fits, compile."""
from __future__ import annotations

import math
import os
import random
import signal

import pytest
import torch

from unetlm.api import build_model, load_checkpoint
from unetlm.core.errors import RunError
from unetlm.recipe import RecipeError, recipe_from_dict
from unetlm.checkpoint import sharded, store
from unetlm.checkpoint.sharded import read_train_state
from unetlm.train import loop
from unetlm.train.metrics import read_metrics
from unetlm.train.resolve import autocast_dtype
from unetlm.train.scaling import fitted_batch_bytes, fitted_lr, resolve_budget, round_batch

WORDS = "the a byte model learns words from text and pools them into coarser stages then back".split()


def write_corpus(directory, docs: int = 8, words: int = 500) -> str:
    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        text = " ".join(rng.choice(WORDS) for _ in range(words)) + ".\n"
        (directory / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return str(directory / "*.txt")


def tiny_recipe_dict(data_glob: str, **training) -> dict:
    spec = {
        "steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 3,
        "sample_bytes": 0, "device": "cpu", "compile": False, "lr": 3e-3,
    }
    spec.update(training)
    attn = {"name": "attention", "head_dim": 8}
    return {
        "name": "tiny",
        "model": {
            "seq_len": 64,
            "stages": [
                {"dim": 16, "layers": 1, "mixer": attn},
                {"dim": 32, "layers": 1, "max_len": 32, "mixer": attn, "splitter": {"name": "regex", "preset": "word"},
                 "pooler": {"name": "select"}, "upsampler": {"name": "multi-linear"}},
            ],
        },
        "data": {"source": "files", "paths": [data_glob], "valid_fraction": 0.2},
        "training": spec,
    }


def tiny_recipe(data_glob: str, **training):
    return recipe_from_dict(tiny_recipe_dict(data_glob, **training))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}


def saved(run_dir) -> dict:
    """The train record of a run's newest valid checkpoint."""
    return store.latest(run_dir, read_train_state)[1]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir)[0].state_dict()


@pytest.fixture(scope="module")
def full_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    result = loop.train(tiny_recipe(corpus, sample_bytes=8), out, progress=False)
    return out, result


def test_run_writes_its_files(full_run):
    out, result = full_run
    assert (out / "recipe.toml").is_file() and [s for s, _ in store.committed(out)] == [3, 6]  # keep_checkpoints = 2
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert math.isfinite(result["val_bpb"]) and result["sample"].startswith("The ")
    state = saved(out)
    assert state["step"] == 6 and state["world_size"] == 1
    assert {"scheduler", "rng", "recipe", "tokenizer"} <= set(state)
    stored = sharded.check_directory(store.step_dir(out, 6), verify=True).state_dict_metadata
    assert {key.split(".")[0] for key in stored} == {"model", "optimizer", "train"}
    model, _ = load_checkpoint(out)
    assert sum(p.numel() for p in model.parameters()) > 0


def interrupt_at(monkeypatch, at_step: int, sig: int = signal.SIGINT) -> None:
    """Deliver ``sig`` to this process (as Ctrl-C or a scheduler would) while the batch of step
    ``at_step`` is read: the run finishes that step, saves it and stops."""
    real = loop.step_batches

    def patched(data, start, stop, *args):
        def gen():
            for step, batch in zip(range(start + 1, stop + 1), real(data, start, stop, *args)):
                if step == at_step:
                    os.kill(os.getpid(), sig)
                yield batch
        return gen()

    monkeypatch.setattr(loop, "step_batches", patched)


def test_resume_equals_uninterrupted(full_run, corpus, tmp_path, monkeypatch):
    out, _ = full_run
    recipe = tiny_recipe(corpus, sample_bytes=8)
    with monkeypatch.context() as m:
        interrupt_at(m, 4)  # Ctrl-C during step 4 (no checkpoint is due there: checkpoint_every = 3)
        result = loop.train(recipe, tmp_path, progress=False)
    assert result["interrupted"] == "SIGINT" and result["step"] == 4
    assert saved(tmp_path)["step"] == 4 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    loop.train(recipe, tmp_path, resume=True, progress=False)
    assert_same_run(out, tmp_path, tol=1e-6)


def assert_same_run(want_dir, got_dir, tol: float) -> None:
    """Equal losses at every step and equal final weights."""
    want, got = losses(want_dir), losses(got_dir)
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=tol), step
    a, b = weights(want_dir), weights(got_dir)
    assert all(torch.allclose(a[k], b[k], atol=tol) for k in a)


def test_resume_refuses_a_different_recipe(full_run, corpus):
    out, _ = full_run
    changed = tiny_recipe(corpus, sample_bytes=8, lr=1e-3, weight_decay=0.0)
    with pytest.raises(loop.TrainingError) as err:
        loop.train(changed, out, resume=True, progress=False)
    assert "training.lr: 0.003 -> 0.001" in str(err.value)
    assert "training.weight_decay: 0.1 -> 0.0" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(loop.TrainingError, match="another recipe"):
        loop.train(changed, out, progress=False)  # --resume auto, the default
    with pytest.raises(loop.TrainingError, match=r"holds a checkpoint \(step 6\) and --resume no"):
        loop.train(changed, out, resume=False, progress=False)


def test_resume_auto_starts_fresh_then_continues(full_run, corpus, tmp_path, monkeypatch):
    """--resume auto is safe to repeat: a fresh directory starts, an interrupted one continues."""
    out, _ = full_run
    recipe = tiny_recipe(corpus, sample_bytes=8)
    with monkeypatch.context() as m:
        interrupt_at(m, 2, signal.SIGUSR1)
        assert loop.train(recipe, tmp_path, resume="auto", progress=False)["interrupted"] == "SIGUSR1"
    assert saved(tmp_path)["step"] == 2
    loop.train(recipe, tmp_path, resume="auto", progress=False)
    assert_same_run(out, tmp_path, tol=1e-6)
    with pytest.raises(loop.TrainingError, match="training.lr"):
        loop.train(tiny_recipe(corpus, sample_bytes=8, lr=1e-3), tmp_path, resume="auto", progress=False)


def test_resume_falls_back_past_a_damaged_checkpoint(full_run, corpus, tmp_path, monkeypatch, capsys):
    """A cut newest checkpoint: a warning naming it, the run continues from the one before and ends
    as the uninterrupted run; the abandoned folder goes at the next commit."""
    out, _ = full_run
    recipe = tiny_recipe(corpus, sample_bytes=8)
    with monkeypatch.context() as m:
        interrupt_at(m, 4)
        loop.train(recipe, tmp_path, progress=False)
    assert [s for s, _ in store.committed(tmp_path)] == [3, 4]
    shard = store.step_dir(tmp_path, 4) / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    loop.train(recipe, tmp_path, resume=True, progress=False, verify=True)
    warning = capsys.readouterr().err.splitlines()[0]
    assert warning.startswith("unetlm: warning: ") and "step-0000004 is damaged: __0_0.distcp has 100 bytes" in warning
    assert "falling back to" in warning and warning.endswith("step-0000003")
    assert_same_run(out, tmp_path, tol=1e-6)
    assert [s for s, _ in store.committed(tmp_path)] == [3, 6]


def test_resume_with_force_and_more_steps(corpus, tmp_path):
    loop.train(tiny_recipe(corpus, steps=3), tmp_path, progress=False)
    result = loop.train(tiny_recipe(corpus, steps=4, lr=1e-3), tmp_path, resume=True, force=True, progress=False)
    assert result["step"] == 4 and saved(tmp_path)["step"] == 4


def test_nan_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real = loop.forward_loss
    calls = {"train": 0}

    def poisoned(model, batch, dtype):
        out = real(model, batch, dtype)
        if model.training:
            calls["train"] += 1
            if calls["train"] == 5:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop, "forward_loss", poisoned)
    with pytest.raises(RunError, match="loss became nan at step 5"):
        loop.train(tiny_recipe(corpus), tmp_path, progress=False)
    assert saved(tmp_path)["step"] == 3
    assert all(torch.isfinite(v).all() for v in weights(tmp_path).values())
    assert max(losses(tmp_path)) == 4


def test_crash_mid_save_keeps_previous_checkpoint(corpus, tmp_path, monkeypatch):
    loop.train(tiny_recipe(corpus, steps=3), tmp_path, progress=False)
    before = weights(tmp_path)

    def crashing_save(state, storage_writer, **kwargs):
        (storage_writer.fs.concat_path(storage_writer.path, "__0_0.distcp")).write_bytes(b"partial shard")
        raise OSError("disk full")

    monkeypatch.setattr(sharded.dcp, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        loop.train(tiny_recipe(corpus, steps=6), tmp_path, resume=True, progress=False)
    monkeypatch.undo()
    assert saved(tmp_path)["step"] == 3
    assert all(torch.equal(before[k], v) for k, v in weights(tmp_path).items())
    assert (tmp_path / "checkpoints" / "step-0000006.tmp").is_dir()  # the failed save's leftover, ignored
    result = loop.train(tiny_recipe(corpus, steps=6), tmp_path, resume=True, progress=False, sample=False)
    assert result["step"] == 6 and saved(tmp_path)["step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]


def test_budget_fits_and_units():
    assert fitted_batch_bytes(1e19) == pytest.approx(0.66 * 1e19**0.321)
    assert 5e5 < fitted_batch_bytes(1e19) < 1e6  # about 100 sequences of 8192 bytes
    assert fitted_lr(1e19) == pytest.approx(6.6 * 1e19**-0.176)
    budget = resolve_budget("auto", "auto", steps=1000, seq_len=512, flops_per_byte=4e6)
    assert budget.compute == pytest.approx(4e6 * 1000 * budget.batch_size * 512)
    # the automatic batch is the fit at the compute it implies, rounded (never by the process count)
    exact = (0.66 * (4e6 * 1000) ** 0.321) ** (1 / 0.679)
    assert fitted_batch_bytes(4e6 * 1000 * exact) == pytest.approx(exact)
    assert budget.batch_size == round_batch(exact / 512) == 32  # 36.7 sequences: the nearest power of two
    assert budget.lr == pytest.approx(fitted_lr(budget.compute))
    fixed = resolve_budget(8, 1e-3, steps=10, seq_len=512, flops_per_byte=4e6)
    assert (fixed.batch_size, fixed.lr, fixed.bytes) == (8, 1e-3, 10 * 8 * 512)


def test_auto_values_in_a_recipe(corpus, tmp_path):
    recipe = tiny_recipe(corpus, steps=2, lr="auto", batch_size="auto")
    assert recipe.training.lr == "auto"
    loop.train(recipe, tmp_path, progress=False)
    records = read_metrics(tmp_path / "metrics.jsonl")
    budget = resolve_budget("auto", "auto", 2, 64, records[0]["flops"] / records[0]["bytes"])
    assert records[0]["bytes"] == budget.batch_size * 64
    with pytest.raises(RecipeError, match="training.lr"):
        recipe_from_dict(tiny_recipe_dict(corpus, lr="fast"))


def test_activation_checkpointing_gives_the_same_gradients(corpus):
    from unetlm.train.parallelize import apply_activation_checkpointing

    tokens = torch.randint(0, 256, (2, 64))
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_recipe(corpus))
        if on:
            apply_activation_checkpointing(model)
        model(tokens, targets=tokens.roll(-1, 1)).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    plain, wrapped = grads
    assert len(plain) == len(wrapped)
    for name, grad in plain.items():  # parameter names keep their place, with the wrapper's prefix
        match = [g for n, g in wrapped.items() if n.replace("._checkpoint_wrapped_module", "") == name]
        assert len(match) == 1 and torch.allclose(grad, match[0], atol=1e-6), name


def five_stage_recipe_dict(data_glob: str, **training) -> dict:
    """Bytes (a window of 8, two blocks: the second reads what the first prepared), words, word pairs,
    4-word chunks and pairs of chunks, each stage a length of its own."""
    data = tiny_recipe_dict(data_glob, **training)
    attn = {"name": "attention", "head_dim": 8}
    splitters = [{"name": "regex", "preset": p} for p in ("word", "word2", "word4")] + [{"name": "fixed-window", "size": 2}]
    data["model"]["stages"] = [{"dim": 16, "layers": 2, "mixer": {**attn, "window": 8}}] + [
        {"dim": 16, "layers": 1, "max_len": length, "mixer": attn, "splitter": splitter,
         "pooler": {"name": "select"}, "upsampler": {"name": "multi-linear"}}
        for length, splitter in zip((32, 24, 16, 12), splitters)
    ]
    return data


@pytest.mark.slow
def test_five_stage_training_compiled_never_falls_back_to_eager(corpus, tmp_path):
    """A 5-stage model compiled whole (checkpointed blocks, transitions, embedding, head and loss),
    trained and evaluated after every step: one graph per mode, none added by later steps or
    evaluations, no graph breaks, a recompile limit that fails rather than falls back to eager, and
    the eager run's losses."""
    from torch._dynamo.utils import counters

    with torch._dynamo.config.patch(debug_backend_override=">=0:aot_eager"):  # no C++ compile
        torch._dynamo.reset()
        counters.clear()
        data = five_stage_recipe_dict(corpus, steps=3, compile=True, activation_checkpointing=True, eval_every=1)
        result = loop.train(recipe_from_dict(data), tmp_path, progress=False, sample=False)
        assert math.isfinite(result["loss"]) and math.isfinite(result["val_bpb"])
        assert torch._dynamo.config.fail_on_recompile_limit_hit
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # training and evaluation
        assert not counters["graph_break"], dict(counters["graph_break"])
        records = read_metrics(tmp_path / "metrics.jsonl")
        assert [r["step"] for r in records if "val_bpb" in r] == [1, 2, 3]  # evaluated after every step
        torch.manual_seed(0)  # the same model and data, eager: the same losses
        eager = tmp_path / "eager"
        data["training"]["compile"] = False
        loop.train(recipe_from_dict(data), eager, progress=False, sample=False)
        got, want = losses(tmp_path), losses(eager)
        for step in (1, 2, 3):
            assert got[step] == pytest.approx(want[step], abs=1e-4), step


def test_plot_several_runs(full_run, corpus, tmp_path):
    pytest.importorskip("matplotlib")
    from unetlm.cli import main
    from unetlm.train.plot import run_curves

    out, _ = full_run
    other = tmp_path / "other"
    other.mkdir()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (other / "metrics.jsonl").write_text("\n".join(lines[:4] + lines[2:]) + "\n")  # steps 3-4 logged twice
    assert [r["step"] for r in run_curves(other)] == [1, 2, 3, 4, 5, 6]
    png = tmp_path / "runs.png"
    assert main(["plot", str(out), str(other), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bfloat16_autocast_on_cpu(corpus, tmp_path):
    recipe = tiny_recipe(corpus, steps=2, dtype="bfloat16")
    assert autocast_dtype(recipe.training, torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype(tiny_recipe(corpus).training, torch.device("cpu")) is None  # auto: fp32 on CPU
    result = loop.train(recipe, tmp_path, progress=False)
    assert math.isfinite(result["loss"]) and math.isfinite(result["val_bpb"])
    assert weights(tmp_path)["head.weight"].dtype == torch.float32


def test_micro_batches_train_like_the_whole_batch(full_run, corpus, tmp_path):
    out, _ = full_run
    loop.train(tiny_recipe(corpus, sample_bytes=8, micro_batch_size=1), tmp_path, progress=False, sample=False)
    assert_same_run(out, tmp_path, tol=1e-5)


def test_micro_batch_that_does_not_divide_the_batch_is_refused(corpus, tmp_path):
    with pytest.raises(loop.TrainingError, match="training.micro_batch_size = 3 does not divide the 4 sequences"):
        loop.train(tiny_recipe(corpus, micro_batch_size=3), tmp_path, progress=False)
