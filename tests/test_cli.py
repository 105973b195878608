"""The command line: list, show, train, generate, and its error reporting."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from unetlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_AU2 = str(ROOT / "recipes" / "tiny" / "au2.toml")


def test_list_prints_every_kind_with_origin(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("splitters:", "poolers:", "upsamplers:", "mixers:"):
        assert kind in out
    for name in ("regex", "fixed-window", "select", "mean", "repeat", "linear", "multi-linear", "attention"):
        assert f"  {name} " in out
    assert "[built-in]" in out


def test_show_reports_stages_params_and_flops(capsys):
    assert main(["show", TINY_AU2, "--set", "model.stages[1].dim=96"]) == 0
    out = capsys.readouterr().out
    assert "dim = 96" in out
    assert "total parameters:" in out and "training FLOPs per byte" in out
    lines = [line for line in out.splitlines() if line.startswith(("0 ", "1 "))]
    assert len(lines) == 2 and "regex(preset=lingua-word" in lines[1]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.steps=\"200\"", "training.steps = '200' is invalid: expected an integer"),
        ("model.stages[1].dimm=3", "did you mean 'dim'"),
        ("model.stages.1.pooler.name=meen", "did you mean 'mean'"),
        ("model.tie_embeddings=\"false\"", "expected true or false"),
    ],
)
def test_bad_override_is_one_clear_error(capsys, override, fragment):
    assert main(["show", TINY_AU2, "--set", override]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def _bytes_stdout(monkeypatch) -> io.BytesIO:
    """Point sys.stdout at a fresh byte buffer (pytest's capture decodes its text strictly)."""
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", write_through=True))
    return raw


def test_train_then_generate(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    args = ["train", TINY_AU2, "--out", str(run), "--quiet", "--set", "training.steps=4",
            "--set", "training.batch_size=2", "--set", "training.eval_every=2", "--set", "training.sample_bytes=8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "validation bits per byte" in out and "sample:" in out
    for name in ("checkpoints/step-0000004/manifest.json", "metrics.jsonl", "recipe.toml"):
        assert (run / name).is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "val_bpb" in records[1] and "val_bpb" in records[3]
    assert "steps = 4" in (run / "recipe.toml").read_text()
    with monkeypatch.context() as patch:
        raw = _bytes_stdout(patch)
        assert main(["generate", str(run), "--prompt", "def ", "--max-bytes", "5", "--seed", "1"]) == 0
        from_run = raw.getvalue()
    assert from_run.startswith(b"def ")
    # export: one safetensors file beside the resolved recipe, read by the same commands
    assert main(["export", str(run), "--out", str(tmp_path / "shared")]) == 0
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["manifest.json", "model.safetensors", "recipe.toml"]
    capsys.readouterr()
    with monkeypatch.context() as patch:
        raw = _bytes_stdout(patch)
        assert main(["generate", str(tmp_path / "shared"), "--prompt", "def ", "--max-bytes", "5", "--seed", "1"]) == 0
        assert raw.getvalue() == from_run
    assert main(["export", str(run), "--out", str(tmp_path / "shared")]) == 2  # never overwrites
    assert "is not an empty directory" in capsys.readouterr().err
    assert main(args) == 0  # the same command again: the run is finished, nothing to do
    assert "already trained to step 4; nothing to do" in capsys.readouterr().out
    assert main([*args, "--resume", "no"]) == 2  # a fresh run into a directory with a checkpoint is refused
    assert "--resume no" in capsys.readouterr().err


def _untrained_bpe(_path, **_kw):
    """``load_checkpoint`` stand-in: a tokenized model whose tokenizer was never trained."""
    import unetlm

    return unetlm.build_model(ROOT / "recipes" / "tiny" / "bpe.toml"), {}


GENERATE = ["generate", "no-such-checkpoint.pt", "--prompt", "Hello"]
TINY = ROOT / "recipes" / "tiny"
BAD_INPUTS = [  # (argv, exit status, the message's fragment, load_checkpoint stand-in)
    ([*GENERATE, "--max-bytes", "-5"], 2, "--max-bytes = -5 is invalid: expected a number of bytes >= 0", None),
    ([*GENERATE, "--top-p", "2"], 2, "--top-p = 2.0 is invalid: expected a number in (0, 1]", None),
    ([*GENERATE, "--top-p", "0"], 2, "--top-p = 0.0 is invalid", None),
    ([*GENERATE, "--top-k", "-3"], 2, "--top-k = -3 is invalid: expected an integer >= 0", None),
    ([*GENERATE, "--temperature", "-1"], 2, "--temperature = -1.0 is invalid: expected a number >= 0 (0: greedy)", None),
    (GENERATE, 1, "has none yet: train the recipe", _untrained_bpe),
    (["train", str(TINY / "byte-mamba.toml"), "--set", "model.stages[0].mixer.backend='cuda'"], 2,
     "model.stages[0].mixer.backend = 'cuda' is invalid on cpu: mamba_ssm's kernels need a CUDA device", None),
    (["train", str(TINY / "au1.toml"), "--set", "model.stages[0].mixer.backend='flex'"], 2,
     "model.stages[0].mixer.backend = 'flex' is invalid on cpu: FlexAttention trains on CUDA only", None),
    (["show", str(TINY / "au2.toml"), "--set", "model.stages[1].splitter={name='wordpiece'}"], 2,
     "a splitter that is not built in comes from a plugin: install the one that provides 'wordpiece' "
     "(a checkpoint needs the plugins it was trained with)", None),
    (["show", str(TINY / "au2.toml"), "--set", "model.stages[1].splitter={name='regex',preset='word',every=8}"], 2,
     "model.stages[1].splitter.every = 8 is invalid: every applies to 'pattern' only", None),
    # the parser's own errors: one line with a --help hint
    (["prepare", str(TINY / "au2.toml")], 2, "the following arguments are required: --out (see unetlm prepare --help)", None),
    (["plan", str(TINY / "au2.toml")], 2, "the following arguments are required: --gpus (see unetlm plan --help)", None),
    ([*GENERATE, "--max-bytes", "abc"], 2, "argument --max-bytes: invalid int value: 'abc' (see unetlm generate --help)", None),
    ([*GENERATE, "--bogus"], 2, "unrecognized arguments: --bogus (see unetlm generate --help)", None),
    (["frobnicate"], 2, "argument command: invalid choice: 'frobnicate'", None),
    (["train", "--stop-at", "0"], 2, "argument --stop-at: '0' is invalid: expected a step >= 1 (see unetlm train --help)", None),
    (["train", "--stop-at", "-1"], 2, "argument --stop-at: '-1' is invalid: expected a step >= 1", None),
    (["prepare", str(TINY / "au2.toml"), "--out", "unused", "--shard-bytes", "abc"], 2,
     "argument --shard-bytes: 'abc' is invalid: expected a number of bytes >= 1, such as 32e6", None),
    (["prepare", str(TINY / "au2.toml"), "--out", str(ROOT / "README.md")], 2,
     "README.md is a file, not a directory for the prepared data", None),
    (["prepare", str(TINY / "au2.toml"), "--out", str(ROOT / "README.md" / "data")], 2,
     "README.md is a file, not a directory for the prepared data", None),
    (["plan", str(TINY / "au2.toml"), "--gpus", "1", "--gpu-memory", "1KiB"], 2,
     "--gpu-memory '1KiB' is invalid: expected a GPU's memory, at least 1GiB (e.g. 80GiB)", None),
    (["plan", str(TINY / "au2.toml"), "--gpus", "1", "--gpu-memory", "1MiB"], 2, "--gpu-memory '1MiB' is invalid", None),
    (["plan", str(TINY / "au2.toml"), "--gpus", "1", "--peak-tflops", "nan"], 2,
     "--peak-tflops nan is invalid: it must be positive and finite", None),
    (["plan", str(TINY / "au2.toml"), "--gpus", "1", "--inter-node-bandwidth", "1e400GB/s"], 2,
     "--inter-node-bandwidth '1e400GB/s' is invalid: expected a finite rate", None),
    (["export", "no-such-run", "--out", "unused"], 2, "checkpoint 'no-such-run' does not exist", None),
]


@pytest.mark.parametrize("argv, status, fragment, loader", BAD_INPUTS, ids=[" ".join(c[0][2:])[-40:] for c in BAD_INPUTS])
def test_bad_input_is_one_line_with_its_exit_status(argv, status, fragment, loader, capsys, monkeypatch, tmp_path):
    import unetlm.api

    if loader is not None:
        monkeypatch.setattr(unetlm.api, "load_checkpoint", loader)
    if argv[0] == "train":
        argv = [*argv, "--set", "training.device='cpu'", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == status
    out, err = capsys.readouterr()
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith("unetlm: error: "), err
    assert fragment in err, err
    assert "Hello" not in out  # options are checked before the prompt is echoed


def test_generate_writes_raw_bytes(tmp_path, monkeypatch):
    """Invalid UTF-8 in the prompt (and in the continuation) reaches stdout as it is."""
    import unetlm
    import unetlm.api

    model = unetlm.build_model(TINY / "au1.toml")
    monkeypatch.setattr(unetlm.api, "load_checkpoint", lambda _path, **_kw: (model, {}))
    prompt = tmp_path / "prompt.bin"
    prompt.write_bytes(b"caf\xe9 \xff")
    for extra in ([], ["--prompt", "x"]):  # one prompt streams; a batch prints at the end
        raw = _bytes_stdout(monkeypatch)
        argv = ["generate", "x.pt", "--prompt-file", str(prompt), *extra, "--max-bytes", "4", "--seed", "0"]
        assert main(argv) == 0
        assert b"caf\xe9 \xff" in raw.getvalue() and raw.getvalue().endswith(b"\n")


def test_a_torchrun_worker_ends_without_interpreter_finalisation(monkeypatch, capsys):
    """One of several torchrun processes leaves through ``end_process`` with the command's status (a
    gloo thread still releasing tensors at finalisation would abort it and lose the status); one
    process returns the status as usual."""
    import unetlm.cli as cli

    ended = []
    monkeypatch.setattr(cli, "end_process", ended.append)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "no-such-recipe.toml"]) == 2 and ended == [2]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["train", "no-such-recipe.toml"]) == 2 and ended == [2]
