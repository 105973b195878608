"""A tiny recipe learns real text."""
from __future__ import annotations

from pathlib import Path

import pytest

import unetlm
from unetlm.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is absent (the shared corpora are not here)")
def test_tiny_au2_loss_falls_on_shakespeare(tmp_path):
    recipe = unetlm.load_recipe(
        ROOT / "recipes" / "tiny" / "au2.toml",
        [
            "data.source=files", f"data.paths=['{SHAKESPEARE.as_posix()}']",
            "training.steps=40", "training.batch_size=8", "training.eval_every=40", "training.lr=5e-3",
        ],
    )
    model = unetlm.build_model(recipe)
    from unetlm.data.corpora import open_corpora, open_training_data
    from unetlm.train.loop import evaluate

    corpora = open_corpora(recipe, progress=False)
    data = open_training_data(corpora, 0.1, recipe.model.seq_len, model.lengths, len(model.splitters), 8, 0)
    import torch

    torch.manual_seed(recipe.training.seed)
    before = evaluate(unetlm.build_model(recipe), data.valid_batches(4), torch.device("cpu"))
    result = train(recipe, tmp_path / "run", progress=False, sample=False)
    assert result["val_loss"] < 0.65 * before, (before, result["val_loss"])
    assert result["val_bpb"] < 5.0  # uniform guessing is 8 bits per byte
