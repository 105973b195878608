"""Print one sentence's boundaries at every stage and the coarse vectors each byte receives.

    python docs/figures/boundaries.py [RECIPE] [--text TEXT] [--no-bos]

Runs the recipe's own splitters and stage links (``model.split``, ``model.links``), so the
picture is what the model computes; the model is built on the meta device, so paper-scale
recipes cost no memory. Bytes are drawn one column each: ``^`` is BOS, ``␣`` a
space, ``⏎`` a newline.
"""
from __future__ import annotations

import argparse

import torch

import unetlm
from unetlm.core.tokens import BOS, documents_from_tokens

DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
SHOWN = {BOS: "^", ord(" "): "␣", ord("\n"): "⏎"}


def draw(model, text: bytes, bos: bool = True) -> str:
    tokens = unetlm.encode(text, bos=bos).unsqueeze(0)
    doc = documents_from_tokens(tokens)
    masks = model.split(tokens, doc)
    links = model.links(tokens, doc, masks)
    names = [f"stage {s + 1}" for s in range(len(masks))]
    row = "".join(SHOWN.get(t, chr(t)) for t in tokens[0].tolist())
    T = len(row)
    lines = [
        f"{'byte':>8}  " + "".join(str(i // 10) if i % 10 == 0 else " " for i in range(T)),
        f"{'':>8}  " + "".join(str(i % 10) for i in range(T)),
        f"{'bytes':>8}  {row}",
    ]
    lines += [f"{n:>8}  " + "".join("|" if b else " " for b in m[0].tolist()) for n, m in zip(names, masks)]
    lines += ["", "the newest vector of each stage that reaches each byte (. = the learned start vector):"]
    lines.append(f"{'bytes':>8}  {row}")
    at = torch.arange(T)  # for each byte: its position in the current stage, -1 = start vector
    for name, lk in zip(names, links):
        seg = lk.fine_seg[0]
        at = torch.where(at >= 0, seg[at.clamp(min=0)] - 1, -1)
        lines.append(f"{name:>8}  " + "".join("." if k < 0 else DIGITS[k % len(DIGITS)] for k in at.tolist()))
    lines.append("")
    for name, lk in zip(names, links):
        pieces, prev = [], -1
        for k, (b, valid) in enumerate(zip(lk.coarse.byte_pos[0].tolist(), lk.coarse.valid[0].tolist())):
            if not valid:
                break
            pieces.append(f"{DIGITS[k % len(DIGITS)]}={row[prev + 1:b + 1]}")
            prev = b
        lines.append(f"{name} vectors: " + "  ".join(pieces))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="recipes/au4.toml")
    parser.add_argument("--text", default="The cat sat on the mat, and 12345 dogs ran.\n", help="\\n is a newline")
    parser.add_argument("--no-bos", action="store_true", help="draw a window that starts inside a document")
    args = parser.parse_args()
    with torch.device("meta"):  # splitting and stage links need no weights: allocate none
        model = unetlm.build_model(unetlm.load_recipe(args.recipe))
    print(draw(model, args.text.replace("\\n", "\n").encode("utf-8"), bos=not args.no_bos))


if __name__ == "__main__":
    main()
