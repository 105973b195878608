"""The ``unetlm`` command line. Heavy modules are imported inside each command."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from unetlm.core.process import end_process, report_error, several_processes

DEFAULT_RECIPE = "recipes/tiny/au2.toml"
AUTO_NOTE = "99.9th percentile of boundaries per window, rounded up to a multiple of 16"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line with a ``--help`` hint (exit status 2), like
    every other bad input; subcommands' parsers are of this class too."""

    def error(self, message: str):
        raise _usage(message, self.prog)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # named with the (sub)command they were given to
            command = filter(None, (getattr(parsed, key, None) for key in ("command", "bench_command")))
            raise _usage(f"unrecognized arguments: {' '.join(extras)}", " ".join([self.prog, *command]))
        return parsed


def _usage(message: str, prog: str):
    from unetlm.core.errors import UsageError

    return UsageError(f"{message} (see {prog} --help)")


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected a step >= 1")
    return value


def _byte_count(text: str) -> int:
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected a number of bytes >= 1, such as 32e6")
    return value


def _add_verify(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--verify", action="store_true",
                   help=f"check the sha256 of every file of {what} against its manifest before reading it")


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
            conflict = reg.blocked(kind, e.name)  # what a recipe naming it gets: this error
            shown = f"unusable: {conflict}" if conflict else f"{e.description}  [{e.origin}]"
            print(f"  {e.name:<{width}}  {shown}")
    for failure in load_failures:
        print(f"(not loaded) {failure}")
    return 0


def cmd_prepare(args) -> int:
    from unetlm.core.errors import UsageError
    from unetlm.data.errors import PreparedDataError
    from unetlm.data.sources import require_source
    from unetlm.recipe import load_recipe

    out = Path(args.out)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {args.out}: {existing} is a file, not a directory for the prepared data")
    recipe = load_recipe(args.recipe, args.overrides)
    require_source(recipe.data)
    try:
        return _prepare(args, recipe)
    except PreparedDataError as exc:  # a damaged, stale or partial directory, or a full disk
        print(f"unetlm: error: {exc}", file=sys.stderr)
        return 1


def _prepare(args, recipe) -> int:
    from unetlm.data.errors import PreparationIncomplete
    from unetlm.data.prepared import PreparedCorpus, prepare

    launched = "WORLD_SIZE" in os.environ  # by torchrun: each rank prepares its share
    shard = args.shard or (f"{os.environ.get('RANK', 0)}/{os.environ['WORLD_SIZE']}" if launched else "0/1")
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        print(f"unetlm: error: --shard {shard!r}: expected I/N, e.g. 0/4", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        out = prepare(recipe, Path(args.out), workers=args.workers, shard=(index, count), skip_bad=args.skip_bad,
                      progress=not args.quiet, shard_bytes=args.shard_bytes)
    except ValueError as exc:
        print(f"unetlm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk is a PreparedDataError; this is e.g. an --out that cannot be written
        print(f"unetlm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished shards of {args.out} are kept; rerun the same command to continue",
              file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - started
    try:
        corpus = PreparedCorpus.open(out)
    except PreparationIncomplete:
        print(f"prepared job {index}/{count} of {out} in {elapsed:.1f} s; the data is complete once every job "
              f"has finished")
        return 0
    if args.verify:
        corpus.verify()
        print(f"verified the sha256 of every file of {out}")
    print(f"prepared {out} in {elapsed:.1f} s: {corpus.num_documents:,} documents, {corpus.num_bytes:,} bytes, "
          f"{corpus.num_tokens:,} tokens, {corpus.num_masks} boundary masks")
    return 0


def cmd_cache(args) -> int:
    from unetlm.data.cache import clear, entries, format_entries, prepared_root

    if args.cache_command == "list":
        print(format_entries(entries()))
        return 0
    removed = clear(args.keys)
    print(f"removed {len(removed)} prepared-data folders ({sum(e.size for e in removed) / 1e6:,.1f} MB) "
          f"from {prepared_root()}")
    return 0


def cmd_show(args) -> int:
    import torch

    from unetlm.api import build_model
    from unetlm.model.summary import summarize
    from unetlm.recipe import dump_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    stats = None
    if args.data:
        from unetlm.data.boundaries import SAMPLE_BYTES, recipe_splitters, sample_masks, stage_stats, with_auto_lengths
        from unetlm.data.sources import InputFile

        with InputFile(args.data) as f:  # a compressed file is read decompressed
            documents = [f.read(SAMPLE_BYTES)]  # the statistics read the head of the data
        if len(documents[0]) + 1 < recipe.model.seq_len:
            print(f"unetlm: error: --data {args.data} holds {len(documents[0])} bytes, fewer than one window of "
                  f"model.seq_len = {recipe.model.seq_len}", file=sys.stderr)
            return 2
        stats = stage_stats(recipe.model, sample_masks(documents, recipe_splitters(recipe.model)))
        recipe = with_auto_lengths(recipe, documents)
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
    if summary.bytes_per_token is None:
        print(f"training FLOPs per token (forward + backward): {summary.train_flops_per_token:,.0f}"
              f" ({summary.train_flops_per_token / 1e6:.3f} MFLOPs); per byte: divided by the bytes per "
              f"token that training measures when it trains the tokenizer")
    else:
        print(f"training FLOPs per byte (forward + backward): {summary.train_flops_per_byte:,.0f}"
              f" ({summary.train_flops_per_byte / 1e6:.3f} MFLOPs)")
    if stats == []:
        print(f"no stage of {args.recipe} is fed by a byte-level splitter: no boundary statistics to report")
    elif stats is not None:
        print(f"boundaries in {args.data} (seq_len windows; auto: the {AUTO_NOTE}):")
        print("stage  max_len  windows overflowing  auto picks  padding of rows")
        for s in stats:
            print(f"{s.stage:<5}  {s.max_len!s:<7}  {s.overflow:<19.2%}  {s.auto:<10}  {s.padding:.2%}")
    return 0


RESUME = {"auto": "auto", "yes": True, "no": False}


def cmd_train(args) -> int:
    from unetlm.recipe import load_recipe
    from unetlm.train.loop import train
    from unetlm.train.preemption import INTERRUPTED

    overrides = list(args.overrides) + (["training.compile=false"] if args.no_compile else [])
    recipe = load_recipe(args.recipe, overrides)
    out = Path(args.out) if args.out else Path("runs") / (recipe.name or Path(args.recipe).stem)
    main = os.environ.get("RANK", "0") == "0"
    try:
        result = train(recipe, out, resume=RESUME[args.resume], force=args.force, progress=not args.quiet,
                       stop_at=args.stop_at, verify=args.verify)
    except KeyboardInterrupt:  # before the run's own handlers: while the data cache was prepared
        if main:
            print("\ninterrupted while preparing the data; finished shards are kept: run the same command again",
                  file=sys.stderr)
        return 130
    if "interrupted" in result:
        if main:
            held = f"{out} holds step {result['step']}" if result["step"] else "no step was trained"
            print(f"interrupted by {result['interrupted']}: {held}; run the same command again to continue",
                  file=sys.stderr)
        return INTERRUPTED
    if not main:
        return 0
    if "loss" not in result:
        print(f"{out} has already trained to step {result['step']}; nothing to do")
    if "val_bpb" in result:
        print(f"validation bits per byte: {result['val_bpb']:.4f}")
    print(f"run directory: {out} (checkpoints/, metrics.jsonl, recipe.toml)")
    if "sample" in result:
        print("sample:")
        print(result["sample"])
    return 0


def cmd_plan(args) -> int:
    import torch

    from unetlm.recipe import load_recipe
    from unetlm.train.activations import MeasurementError
    from unetlm.train.hardware import Hardware, parse_bandwidth, parse_memory
    from unetlm.train.distributed import World
    from unetlm.train.plan import PlanError, describe
    from unetlm.train.resolve import resolve_run

    try:
        memory = parse_memory(args.gpu_memory)
        links = [parse_bandwidth(v, o) for v, o in ((args.intra_node_bandwidth, "--intra-node-bandwidth"),
                                                     (args.inter_node_bandwidth, "--inter-node-bandwidth"),
                                                     (args.memory_bandwidth, "--memory-bandwidth"))]
    except ValueError as exc:
        print(f"unetlm: error: {exc}", file=sys.stderr)
        return 2
    for option, value in (("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node),
                          ("--peak-tflops", args.peak_tflops)):
        if not 0 < value < math.inf:  # NaN fails too
            print(f"unetlm: error: {option} {value} is invalid: it must be positive and finite", file=sys.stderr)
            return 2
    recipe = load_recipe(args.recipe, args.overrides)
    name = recipe.name or Path(args.recipe).stem
    hardware = Hardware(args.gpus, memory, args.peak_tflops * 1e12, gpus_per_node=args.gpus_per_node,
                        intra_node_bandwidth=links[0], inter_node_bandwidth=links[1], memory_bandwidth=links[2])
    world = World(0, args.gpus, 0, torch.device("cuda"))  # the cluster planned for, not this machine
    try:
        run = resolve_run(recipe, world, hardware=hardware)
    except (PlanError, MeasurementError) as exc:  # the configuration cannot run: the numbers say why
        print(f"unetlm: error: {name} on {args.gpus} x {args.gpu_memory}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. a global batch that does not split over --gpus
        print(f"unetlm: error: {exc}", file=sys.stderr)
        return 2
    if run.plan is None:
        print(f"unetlm: error: {name}: {'; '.join(run.notes)}", file=sys.stderr)
        return 1
    print(describe(run.plan, name))
    return 0


def cmd_export(args) -> int:
    from unetlm.checkpoint.export import export

    out = export(args.run_dir, args.out, verify=args.verify)
    print(f"wrote {out} ({', '.join(sorted(p.name for p in out.iterdir()))})")
    return 0


def cmd_plot(args) -> int:
    from unetlm.train.plot import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


def cmd_bench_generate(args) -> int:
    from unetlm.bench.generate import bench_generate

    if args.prompt_bytes is not None:
        from unetlm.bench.generate import bench_first_byte, first_byte_table

        if args.checkpoint or args.match_flops_of or not args.recipes or args.prompt_bytes < 1:
            print("unetlm: error: --prompt-bytes N (N >= 1) measures recipes (random weights): give RECIPE ... "
                  "and neither --checkpoint nor --match-flops-of", file=sys.stderr)
            return 2
        print(first_byte_table(bench_first_byte(args.recipes, args.prompt_bytes, args.json)))
        return 0
    contexts = [int(c) for c in args.context.split(",")]
    bench_generate(args.recipes, contexts, args.json, checkpoint=args.checkpoint, match_flops_of=args.match_flops_of)
    return 0


def cmd_bench_train(args) -> int:
    from unetlm.bench.train import MODES, bench_train, format_table

    modes = tuple(m for m in MODES if m not in args.skip)
    records = bench_train(args.recipes, args.json, modes=modes, steps=args.steps, overrides=args.overrides,
                          reference="reference" not in args.skip)
    print(format_table(records))
    return 0


def cmd_bench_data(args) -> int:
    from unetlm.bench.data import bench_data, format_record

    workers = tuple(int(w) for w in args.workers.split(","))
    record = bench_data(args.recipe, args.corpus_bytes, args.json, workers=workers, steps=args.steps,
                        work_dir=args.work_dir, overrides=args.overrides, layouts=tuple(args.layouts.split(",")))
    print(format_record(record))
    return 0


def _read_prompts(args) -> list[bytes]:
    prompts = [p.encode("utf-8") for p in args.prompt]
    for path in args.prompt_file:
        prompts.append(sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes())
    if not prompts and not sys.stdin.isatty():
        prompts.append(sys.stdin.buffer.read())
    return prompts or [b""]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cmd_generate(args) -> int:
    from unetlm.api import load_checkpoint
    from unetlm.model.cascade import missing_step_api
    from unetlm.model.generate import check_ready, check_sampling, generate

    check_sampling(args.max_bytes, args.temperature, args.top_k, args.top_p, flag=_flag)
    model, _ = load_checkpoint(args.checkpoint, verify=args.verify)
    check_ready(model)
    missing = [] if args.recompute else missing_step_api(model)
    if missing:
        print("unetlm: error: cached generation needs the step protocol of every component: "
              + "; ".join(missing) + " (pass --recompute to recompute the context at every byte)", file=sys.stderr)
        return 1
    prompts = _read_prompts(args)
    out = _binary_stdout()  # raw bytes: invalid UTF-8 survives a pipe

    def show(_index: int, data: bytes) -> None:
        out.write(data)
        out.flush()

    live = show if len(prompts) == 1 else None  # a batch prints row by row at the end
    if live is not None:
        show(0, prompts[0])
    result = generate(
        model, prompts, args.max_bytes, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=args.stop, cached=not args.recompute, on_bytes=live,
    )
    if live is not None:
        show(0, b"\n")
    else:
        for i, (prompt, text) in enumerate(zip(prompts, result)):
            show(i, f"--- [{i}]\n".encode() + prompt + text + b"\n")
    rates = ", ".join(f"stage {i}: {r:.1%}" for i, r in enumerate(result.firing_rates))
    print(f"[{'cached' if result.cached else 'recompute'}; stage firing rates {rates}; "
          f"ended by {', '.join(result.reasons)}]", file=sys.stderr)
    return 0


def _binary_stdout():
    """The byte stream under stdout (text written so far flushed first)."""
    sys.stdout.flush()
    return sys.stdout.buffer


def cmd_patches(args) -> int:
    from unetlm.eval.patches import print_patches

    print_patches(
        args.checkpoint, args.file, threshold=args.threshold, relative_threshold=args.relative_threshold,
        max_patch=args.max_patch, max_bytes=args.max_bytes,
    )
    return 0


def cmd_eval(args) -> int:
    from unetlm.eval.report import format_table, write_json
    from unetlm.eval.suite import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, bpb_files=args.bpb, choice_files=args.choice, cute_words=args.cute_words,
        cute_text=args.cute_text, cute_tasks=args.cute_tasks, cute_items=args.cute_items, shots=args.shots,
        stride=args.stride, batch_size=args.batch_size, resamples=args.resamples, seed=args.seed,
        device=args.device, verify=args.verify,
    )
    print(format_table(result))
    for row in result["bpb"]:
        if row["truncated"]:
            print(f"warning: {row['name']}: {row['truncated']} boundaries truncated by max_len", file=sys.stderr)
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    return 0


def cmd_compare(args) -> int:
    from unetlm.compare import compare, data_spec, parse_flops
    from unetlm.sweep.local import SweepInterrupted
    from unetlm.sweep.report import results_markdown

    budget = parse_flops(args.flops)
    data = data_spec(args.data, args.max_bytes, args.valid_fraction)
    try:
        results = compare(
            args.recipes, budget, args.out, data, args.overrides, eval_bytes=args.eval_bytes,
            cute_items=args.cute_items, choice_files=args.choice, progress=not args.quiet, seed=args.seed,
        )
    except SweepInterrupted as exc:
        print(f"unetlm: {exc}", file=sys.stderr)
        return 75
    print(results_markdown(results))
    print(f"\nwrote results.md, results.json{_figure_names(results)} to {args.out}")
    return _unscored_status(results)


def _figure_names(results: dict) -> str:
    names = [v for k, v in results["figures"].items() if k != "missing"]
    return "".join(f", {n}" for n in names)


def _unscored_status(results: dict) -> int:
    """1 (a run cannot go on) when a run of the report failed or is unfinished, with one line naming them."""
    unscored = results["unscored"]
    if unscored:
        names = ", ".join(f"{u['name']} ({u['state']})" for u in unscored)
        print(f"unetlm: error: {len(unscored)} run(s) not scored: {names}", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args) -> int:
    if args.target in ("status", "report"):
        if not args.directory or args.out or args.dry_run:
            print(f"unetlm: error: sweep {args.target} SWEEP_DIR: give the sweep directory (and no --out or "
                  f"--dry-run)", file=sys.stderr)
            return 2
        return _sweep_status(args) if args.target == "status" else _sweep_report(args)
    if args.directory:
        print(f"unetlm: error: sweep {args.target} {args.directory}: the sweep directory is --out "
              f"(unetlm sweep SWEEP.toml --out DIR)", file=sys.stderr)
        return 2
    if not args.out:
        print("unetlm: error: --out: required, the sweep directory (e.g. --out sweeps/NAME)", file=sys.stderr)
        return 2
    if args.parallel is not None and args.parallel < 0:
        print(f"unetlm: error: --parallel {args.parallel}: expected 0 (all at once) or more", file=sys.stderr)
        return 2
    from unetlm.sweep.launch import dry_run, launch, plan_sweep
    from unetlm.sweep.local import SweepInterrupted
    from unetlm.sweep.spec import load_sweep

    sweep = plan_sweep(load_sweep(args.target), args.out, args.target)
    if args.dry_run:
        dry_run(sweep, args.executor, progress=not args.quiet)
        return 0
    try:
        outcome = launch(sweep, args.executor, args.parallel, progress=not args.quiet)
    except SweepInterrupted as exc:
        print(f"unetlm: {exc}", file=sys.stderr)
        return 75
    if args.executor == "slurm":
        return 0
    busy = (f"{len(outcome.busy)} still running from an earlier start ({', '.join(outcome.busy)}): run the same "
            f"command again once they end") if outcome.busy else ""
    if outcome.failed:
        for name, why in outcome.failed:
            print(f"{name}: {why}", file=sys.stderr)
        print(f"unetlm: error: {len(outcome.failed)} of {len(sweep.runs)} runs failed (their logs: {args.out}/logs/); "
              + (busy or "the others finished"), file=sys.stderr)
        return 1
    if busy:
        print(f"unetlm: {len(outcome.done)} of {len(sweep.runs)} runs finished; {busy}", file=sys.stderr)
        return 75
    print(f"all {len(sweep.runs)} runs finished; `unetlm sweep report {args.out}` scores and compares them")
    return 0


def _sweep_status(args) -> int:
    from unetlm.sweep.directory import SweepDir
    from unetlm.sweep.status import status_text, sweep_status

    print(status_text(sweep_status(SweepDir.open(args.directory))))
    return 0


def _sweep_report(args) -> int:
    from unetlm.sweep.report import report, results_markdown

    results = report(args.directory, progress=not args.quiet)
    print(results_markdown(results))
    print(f"\nwrote results.md, results.json{_figure_names(results)} to {args.directory}")
    return _unscored_status(results)


def cmd_harness(args) -> int:
    from unetlm.eval.harness import run_harness
    from unetlm.eval.report import write_json

    result = run_harness(args.checkpoint, args.tasks, limit=args.limit, device=args.device,
                         batch_size=args.batch_size, num_fewshot=args.num_fewshot, include_path=args.include_path)
    for task, metrics in result["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{task}: {shown}")
    if args.json:
        print(f"wrote {write_json(result['results'], args.json)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="unetlm", description="Tokenizer-free hierarchical byte language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="print every registered component")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="print a resolved recipe with per-stage parameters and FLOPs")
    p.add_argument("recipe")
    p.add_argument("--data", metavar="FILE", help="also report each stage's boundary statistics on this file")
    _add_overrides(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("prepare", help="write a recipe's data as memory-mapped shards of tokens, documents and masks")
    p.add_argument("recipe")
    _add_overrides(p)
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="folder of the prepared data")
    p.add_argument("--workers", type=int, default=1, help="processes preparing shards (default 1)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="prepare only job I's share of N independent jobs (default: RANK/WORLD_SIZE under "
                        "torchrun, else 0/1: everything)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) jsonl lines that are not JSON objects")
    p.add_argument("--shard-bytes", type=_byte_count, default="32e6",
                   help="input bytes per unit of work and stream bytes per shard (default 32e6); fixed for a DATA_DIR")
    p.add_argument("--verify", action="store_true",
                   help="once the data is complete, check every file's sha256 against its manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    cache = sub.add_parser("cache", help="list or clear the prepared data that training caches")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="list|clear", required=True)
    p = cache_sub.add_parser("list", help="each cached preparation: key, size, last use, state, splitters, sources")
    p.set_defaults(func=cmd_cache)
    p = cache_sub.add_parser("clear", help="remove cached preparations (all, or those named)")
    p.add_argument("keys", nargs="*", metavar="KEY", help="keys (or their first characters) from unetlm cache list")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe", nargs="?", default=DEFAULT_RECIPE, help=f"recipe file (default {DEFAULT_RECIPE})")
    _add_overrides(p)
    p.add_argument("--out", help="run directory (default runs/RECIPE_NAME)")
    p.add_argument("--resume", nargs="?", const="yes", default="auto", choices=sorted(RESUME),
                   help="auto (default): continue the run directory's checkpoint if it has one, else start fresh "
                        "(the same command is safe to repeat, e.g. after a requeue); yes (or bare --resume): a "
                        "checkpoint must exist; no: refuse a directory that has one")
    p.add_argument("--force", action="store_true", help="resume even if the recipe changed")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--no-compile", action="store_true", help="run the model eagerly (training.compile = false)")
    p.add_argument("--stop-at", type=_step, default=None, metavar="STEP",
                   help="stop after STEP (>= 1) with a checkpoint (e.g. the end of a cluster job); run the same command to continue")
    _add_verify(p, "the checkpoint resumed from")
    p.epilog = ("exit status: 0 finished (or --stop-at reached); 75 interrupted by SIGTERM, SIGUSR1 or SIGINT after "
                "saving a checkpoint (run the same command again); 1 the run cannot go on; 2 bad input")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="per-GPU memory, micro-batch, communication and step time of a recipe")
    p.add_argument("recipe")
    p.add_argument("--gpus", type=int, required=True, help="processes (GPUs) the run shards over")
    p.add_argument("--gpu-memory", default="80GiB", help="memory per GPU (default 80GiB)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (default 989, H100)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs sharing a node's NVLink (default 8)")
    p.add_argument("--intra-node-bandwidth", default="450GB/s",
                   help="NVLink rate per GPU and direction (default 450GB/s, H100 SXM)")
    p.add_argument("--inter-node-bandwidth", default="400Gb/s",
                   help="InfiniBand rate per GPU and direction (default 400Gb/s, one NDR NIC per GPU)")
    p.add_argument("--memory-bandwidth", default="3.35TB/s", help="HBM rate per GPU (default 3.35TB/s, H100 SXM)")
    _add_overrides(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="consolidate a run's sharded checkpoint into model.safetensors + recipe.toml")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or an exported directory, or a .pt file)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not exist or be empty)")
    _add_verify(p, "the checkpoint")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="plot loss and validation bits/byte of runs against bytes and FLOPs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="runs.png", help="PNG file to write (default runs.png)")
    p.set_defaults(func=cmd_plot)

    bench = sub.add_parser("bench", help="measure speed").add_subparsers(dest="bench_command", required=True)
    p = bench.add_parser("train", help="training bytes/s and MFU, eager and compiled, beside a plain transformer")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    _add_overrides(p)
    p.add_argument("--json", required=True, help="file to write the list of records to")
    p.add_argument("--steps", type=int, default=10, help="timed steps per recipe and mode (after warmup)")
    p.add_argument("--skip", action="append", default=[], choices=["eager", "compiled", "regions", "reference"],
                   help="leave out a mode (compiled: the whole forward, as one process trains; regions: as an FSDP2 "
                        "run compiles) or the reference transformer")
    p.set_defaults(func=cmd_bench_train)

    p = bench.add_parser("generate", help="generation bytes/s and peak memory, cached against recompute")
    p.add_argument("recipes", nargs="*", metavar="RECIPE")
    p.add_argument("--context", default="256,1024,2048,4096", help="comma-separated context lengths in bytes")
    p.add_argument("--checkpoint", default=None, help="measure a trained checkpoint instead of random weights")
    p.add_argument("--match-flops-of", default=None, metavar="RECIPE",
                   help="also cut a byte transformer to this recipe's FLOPs per byte and measure it")
    p.add_argument("--prompt-bytes", type=int, default=None, metavar="N",
                   help="instead: time to the first byte after an N-byte prompt, prefilled against stepped")
    p.add_argument("--json", required=True, help="file to write the list of records to")
    p.set_defaults(func=cmd_bench_generate)

    p = bench.add_parser("data", help="prepare throughput and memory, loader bytes/s and training peak memory on a "
                                      "large corpus")
    p.add_argument("recipe")
    p.add_argument("--corpus-bytes", type=_byte_count, default="2e8",
                   help="document bytes of the corpus written to disk (default 2e8)")
    p.add_argument("--json", required=True, help="file to write the record to")
    p.add_argument("--workers", default="1,2", help="comma-separated prepare worker counts (default 1,2)")
    p.add_argument("--steps", type=int, default=5, help="training steps on the prepared data (default 5)")
    p.add_argument("--layouts", default="jsonl",
                   help="comma-separated corpus layouts: jsonl (a line per document), one-file (one document), "
                        "1mb-files (documents of 1 MB); training runs on the first (default jsonl)")
    p.add_argument("--work-dir", help="keep the corpora and prepared data here (default: a temporary directory)")
    _add_overrides(p)
    p.set_defaults(func=cmd_bench_data)

    p = sub.add_parser("generate", help="continue prompts with a trained checkpoint, streaming the output")
    p.add_argument("checkpoint", help="a run directory, an exported directory (unetlm export) or a .pt file")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", default=[], metavar="FILE",
                   help="read a prompt from FILE ('-' for stdin; repeat for a batch); stdin is read if no prompt is given")
    p.add_argument("--max-bytes", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop a row when it produces this string (repeatable)")
    p.add_argument("--recompute", action="store_true", help="recompute the whole prefix per byte instead of caching")
    _add_verify(p, "the checkpoint")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("patches", help="print how a checkpoint's splitter (or an entropy model) patches a text")
    p.add_argument("checkpoint", help="a run directory, an exported directory (unetlm export) or a .pt file")
    p.add_argument("file")
    p.add_argument("--threshold", type=float, default=None, help="global entropy threshold in nats (entropy models)")
    p.add_argument("--relative-threshold", type=float, default=None, help="BLT's monotonic rule: H(t) - H(t-1) > this")
    p.add_argument("--max-patch", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=4000, help="bytes of the file to show (0: all)")
    p.set_defaults(func=cmd_patches)

    p = sub.add_parser("eval", help="bits/byte, multiple-choice and CUTE-style scores with 95%% bootstrap CIs")
    p.add_argument("checkpoint", help="a run directory, an exported directory (unetlm export) or a .pt file")
    p.add_argument("--bpb", nargs="+", default=[], metavar="FILE", help="held-out files, one row each")
    p.add_argument("--choice", nargs="+", default=[], metavar="JSONL", help="multiple-choice tasks")
    p.add_argument("--cute-words", metavar="FILE", help="CUTE-style tasks from a word list (one per line)")
    p.add_argument("--cute-text", metavar="FILE", help="CUTE-style tasks from the words of a text")
    p.add_argument("--cute-tasks", nargs="+", metavar="TASK", help="subset of tasks (default: all)")
    p.add_argument("--cute-items", type=int, default=50, help="items per CUTE task (default 50)")
    p.add_argument("--shots", type=int, default=3, help="solved examples per CUTE prompt (default 3)")
    p.add_argument("--stride", type=int, help="bytes scored per bits/byte window after the first (default seq_len/2)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the CUTE items and the bootstrap")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    _add_verify(p, "the checkpoint")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train recipes for one FLOP budget on the same data and compare them")
    p.add_argument("recipes", nargs="+", metavar="RECIPE")
    p.add_argument("--flops", required=True, help="training FLOPs per recipe, e.g. 2e12")
    p.add_argument("--data", nargs="+", default=["pydocs"], metavar="SOURCE",
                   help="'pydocs' (default) or text files/globs, each file one document")
    p.add_argument("--max-bytes", type=int, default=0, help="read at most this many bytes of data (0: all)")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="held-out share of the data's bytes (default 0.1)")
    p.add_argument("--out", default="compare", help="output directory (default compare); rerun to resume")
    p.add_argument("--eval-bytes", type=int, default=200_000, help="held-out bytes to score (0: all; default 200000)")
    p.add_argument("--cute-items", type=int, default=0, help="items per CUTE-style task from the held-out words (0: none)")
    p.add_argument("--choice", nargs="+", default=[], metavar="JSONL", help="multiple-choice tasks")
    p.add_argument("--seed", type=int, default=0, help="seed of the CUTE items and the bootstrap")
    p.add_argument("--quiet", action="store_true", help="no training progress output")
    _add_overrides(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "sweep", help="run a grid of recipes and overrides (locally or on Slurm); its status; its report",
        description="unetlm sweep SWEEP.toml --out DIR [--executor local|slurm] [--dry-run] [--parallel N]: "
                    "train every run of the sweep file into DIR (rerun to continue). unetlm sweep status DIR: "
                    "one line per run. unetlm sweep report DIR: score the finished runs on the same held-out text, "
                    "compare and fit them (DIR/results.md and figures).",
    )
    p.add_argument("target", metavar="SWEEP.toml | status | report")
    p.add_argument("directory", nargs="?", metavar="SWEEP_DIR", help="the sweep directory (status, report)")
    p.add_argument("--out", metavar="DIR", help="the sweep directory to write (running a sweep)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: on this machine (default); slurm: one job per run, through submitit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs, their steps, FLOPs and planned memory, their commands (and for slurm the "
                        "job script); start nothing")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="local: runs at once (default: the sweep's resources.parallel, 1; 0: all)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("harness", help="run lm-evaluation-harness tasks on a checkpoint (needs unetlm[harness])")
    p.add_argument("checkpoint", help="a run directory, an exported directory (unetlm export) or a .pt file")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="harness task names, e.g. hellaswag")
    p.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--include-path", metavar="DIR", help="a folder of extra task YAML files (e.g. local data)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="OUT", help="also write the harness's results as JSON")
    p.set_defaults(func=cmd_harness)
    return parser


def exit_status(exc: BaseException) -> int | None:
    """The exit status of an error the command line reports as one line: 2 when the input is
    wrong, 1 when a run failed; None for anything else (a bug: its traceback is shown)."""
    from unetlm.core.errors import RunError, UsageError
    from unetlm.train.errors import TrainingError

    # ValueError: bad input caught below the command line (eval's and compare's options);
    # ImportError: an optional extra is missing (the message names it)
    bad_path = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
    if isinstance(exc, (UsageError, TrainingError, ValueError, ImportError, *bad_path)):
        return 2
    if isinstance(exc, (RunError, OSError)):  # OSError: e.g. a full disk
        return 1
    return None


def main(argv: list[str] | None = None) -> int:
    status = run_command(argv)
    if several_processes():
        end_process(status)
    return status


def run_command(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)  # a bad option is a UsageError, reported below
        return args.func(args)
    except Exception as exc:
        status = exit_status(exc)
        if status is None:
            raise
        report_error(f"unetlm: error: {exc}")
        return status


if __name__ == "__main__":
    sys.exit(main())
