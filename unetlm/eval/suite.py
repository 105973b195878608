"""``unetlm eval``: bits per byte, multiple-choice and CUTE-style tasks for one checkpoint.

Returns a JSON-ready dict: ``checkpoint``, ``settings`` and one list of rows per kind
(``bpb``, ``choice``, ``cute``), every score with its 95% bootstrap interval ``ci``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from unetlm.eval.bpb import file_bpb
from unetlm.eval.choice import evaluate_choice
from unetlm.eval.cute import TASKS, evaluate_cute, make_items, words_from_list, words_from_text


def evaluate_checkpoint(
    checkpoint: str | Path,
    bpb_files: list[str] = (),
    choice_files: list[str] = (),
    cute_words: str | None = None,
    cute_text: str | None = None,
    cute_tasks: list[str] | None = None,
    cute_items: int = 50,
    shots: int = 3,
    stride: int | None = None,
    batch_size: int = 8,
    resamples: int = 1000,
    seed: int = 0,
    device: str = "cpu",
    verify: bool = False,
) -> dict:
    from unetlm.checkpoint.trained import load_trained

    if cute_words and cute_text:
        raise ValueError("give --cute-words or --cute-text, not both")
    for task in cute_tasks or ():
        if task not in TASKS:
            raise ValueError(f"unknown CUTE task {task!r}; tasks: {', '.join(TASKS)}")
    model, _ = load_trained(checkpoint, verify=verify)
    model.to(torch.device(device))
    stride = stride or max(1, model.spec.seq_len // 2)
    common = dict(batch_size=batch_size, resamples=resamples, seed=seed)
    result = {
        "checkpoint": str(checkpoint),
        "settings": {
            "seq_len": model.spec.seq_len, "stride": stride, "batch_size": batch_size, "resamples": resamples,
            "seed": seed, "shots": shots, "cute_items": cute_items, "confidence": 0.95,
        },
        "bpb": [file_bpb(model, f, stride=stride, **common).to_dict() for f in bpb_files],
        "choice": [evaluate_choice(model, f, **common).to_dict() for f in choice_files],
        "cute": [],
    }
    source = cute_words or cute_text
    if source:
        words = words_from_list(source) if cute_words else words_from_text(source)
        items = [it for task in (cute_tasks or TASKS) for it in make_items(task, words, cute_items, seed, shots)]
        result["settings"]["cute_source"] = str(source)
        result["cute"] = [row.to_dict() for row in evaluate_cute(model, items, **common)]
    return result
