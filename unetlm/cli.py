"""The ``unetlm`` command line. Heavy modules are imported inside each command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_RECIPE = "recipes/tiny/au2.toml"


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set training.steps=10 --set model.stages[1].dim=256",
    )


def cmd_list(args) -> int:
    from unetlm.plugins import load_failures, registry
    from unetlm.registry import KINDS

    reg = registry()
    for kind in KINDS:
        print(f"{kind}s:")
        entries = reg.entries(kind)
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            print(f"  {e.name:<{width}}  {e.description}  [{e.origin}]")
    for failure in load_failures:
        print(f"(not loaded) {failure}")
    return 0


def cmd_show(args) -> int:
    import torch

    from unetlm.api import build_model
    from unetlm.model.summary import summarize
    from unetlm.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(dump_recipe(recipe))
    with torch.device("meta"):
        model = build_model(recipe)
    summary = summarize(model)
    header = ("stage", "dim", "layers", "heads", "mixer", "splitter", "max_len", "params", "train GFLOP/seq")
    rows = [
        (
            str(s.index), str(s.dim), f"{s.layers}" + (f"+{s.decoder_layers}" if s.decoder_layers else ""),
            s.heads, s.mixer, s.splitter, str(s.max_len), f"{s.params:,}", f"{s.train_flops / 1e9:.3f}",
        )
        for s in summary.stages
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"total parameters: {summary.params:,}")
    print(f"training FLOPs per byte (forward + backward): {summary.train_flops_per_byte:,.0f}"
          f" ({summary.train_flops_per_byte / 1e6:.3f} MFLOPs)")
    return 0


def cmd_train(args) -> int:
    from unetlm.recipe import load_recipe
    from unetlm.train.loop import train

    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / (recipe.name or Path(args.recipe).stem)
    result = train(recipe, out, resume=args.resume, force=args.force, progress=not args.quiet)
    if "val_bpb" in result:
        print(f"validation bits per byte: {result['val_bpb']:.4f}")
    print(f"run directory: {out} (checkpoint.pt, metrics.jsonl, recipe.toml)")
    if "sample" in result:
        print("sample:")
        print(result["sample"])
    return 0


def cmd_generate(args) -> int:
    from unetlm.api import load_checkpoint
    from unetlm.model.generate import generate

    model, _ = load_checkpoint(args.checkpoint)
    prompt = args.prompt.encode("utf-8")
    text = generate(model, prompt, args.max_bytes, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    sys.stdout.write((prompt + text).decode("utf-8", errors="replace") + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unetlm", description="Tokenizer-free hierarchical byte language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="print every registered component")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="print a resolved recipe with per-stage parameters and FLOPs")
    p.add_argument("recipe")
    _add_overrides(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help=f"recipe file (default {DEFAULT_RECIPE})")
    _add_overrides(p)
    p.add_argument("--out", help="run directory (default runs/RECIPE_NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--force", action="store_true", help="resume even if the recipe changed")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-bytes", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unetlm.recipe.errors import RecipeError
    from unetlm.registry import RegistryError

    try:
        return args.func(args)
    except (RecipeError, RegistryError) as exc:
        print(f"unetlm: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"unetlm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
