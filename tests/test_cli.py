"""The command line: list, show, train, generate, and its error reporting."""
from __future__ import annotations

import json
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
    assert len(lines) == 2 and "regex(preset=word" in lines[1]


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


def test_train_then_generate(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", TINY_AU2, "--out", str(run), "--quiet", "--set", "training.steps=4",
            "--set", "training.batch_size=2", "--set", "training.eval_every=2", "--set", "training.sample_bytes=8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "validation bits per byte" in out and "sample:" in out
    for name in ("checkpoint/.metadata", "metrics.jsonl", "recipe.toml"):
        assert (run / name).is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "val_bpb" in records[1] and "val_bpb" in records[3]
    assert "steps = 4" in (run / "recipe.toml").read_text()
    assert main(["generate", str(run), "--prompt", "def ", "--max-bytes", "5", "--seed", "1"]) == 0
    from_run = capsys.readouterr().out
    assert from_run.startswith("def ")
    # export: one safetensors file beside the resolved recipe, read by the same commands
    assert main(["export", str(run), "--out", str(tmp_path / "shared")]) == 0
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["model.safetensors", "recipe.toml"]
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "shared"), "--prompt", "def ", "--max-bytes", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out == from_run
    assert main(["export", str(run), "--out", str(tmp_path / "shared")]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err
    assert main(args) == 2  # a second run into the same directory is refused, with a reason
    assert "pass --resume" in capsys.readouterr().err
