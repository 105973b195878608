"""The GPU check: what a cluster run needs, on one GPU, in minutes.

``python -m unetlm.bench.gpu_check --json OUT`` (what ``scripts/gpu-check.sh`` runs):

- ``train_au4``: AU-Net 4 at full width with ``DEPTH`` layers per stack, set up and trained by the
  real ``Trainer`` inside a one-rank process group (NCCL), so the model is built on the meta device,
  sharded by FSDP2 under its mixed-precision policy and materialised, its checkpointed blocks are
  compiled (FlexAttention), the planner picks the micro-batch, and a step ends with evaluation and a
  background DCP checkpoint. It fails when the peak memory is more than 15% off the plan or any block
  fell back to eager (a graph break, or dynamo's recompile limit, made an error here); it records
  measured against planned memory, step time and MFU.
- ``torchrun_sigterm``: a one-process torchrun job is sent SIGTERM mid-run; it must leave a
  checkpoint of the step it reached, and the same command with ``--resume auto`` must finish.
- ``flex_vs_sdpa``: FlexAttention equals SDPA, eager and compiled; ``mamba_vs_mamba_ssm``: the Mamba
  mixer equals mamba_ssm's kernels (when installed).

Without CUDA (or with ``--dry-run``) the same code runs on tiny sizes on the CPU, eager, over gloo,
so a test exercises it cheaply; the CUDA-only parts are skipped with a message. Every check records
its figures or its error in the JSON; the exit status is 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import unetlm
from unetlm.core.layout import byte_stage
from unetlm.data.loader import step_batches
from unetlm.recipe import dump_recipe, load_recipe
from unetlm.checkpoint.sharded import read_train_state
from unetlm.checkpoint.store import latest
from unetlm.train.hardware import cuda_hardware
from unetlm.train.loop import Trainer
from unetlm.train.metrics import read_metrics
from unetlm.train.distributed import World

DEPTH = 2  # layers per stack at full width: every stage and block kind, few enough to compile quickly
MEMORY_TOLERANCE = 0.15  # |measured - planned| / planned
ROOT = Path(__file__).resolve().parents[2]
TEXT_FILES = [d / "shared" / "data" / "tinyshakespeare.txt" for d in (ROOT, ROOT.parent)]


def saved_step(run_dir: Path) -> int | None:
    """The step of the run's newest valid checkpoint; None when it has none."""
    found = latest(run_dir, read_train_state)
    return None if found is None else found[1]["step"]


def data_overrides() -> list[str]:
    """Train on tinyshakespeare where the repository's shared data has it, else the built-in text."""
    text = next((f for f in TEXT_FILES if f.exists()), None)
    return ['data.source="pydocs"'] if text is None else ['data.source="files"', f'data.paths=["{text}"]']


def reduced_recipe(name: str, dry: bool, steps: int):
    """recipes/NAME.toml at full width with at most DEPTH layers per stack, compiled, checkpointed, bf16,
    the micro-batch planned; dry: recipes/tiny/NAME.toml four times shorter, eager."""
    path = ROOT / "recipes" / ("tiny" if dry else "") / f"{name}.toml"
    recipe = load_recipe(path)
    overrides = data_overrides() + [
        "training.activation_checkpointing=true", 'training.micro_batch_size="auto"', 'training.dtype="bfloat16"',
        f"training.compile={str(not dry).lower()}", f"training.batch_size={4 if dry else 16}", "training.lr=1e-3",
        f"training.steps={steps}", f"training.eval_every={steps}", "training.eval_batches=1",
        f"training.checkpoint_every={steps}", "training.async_checkpoint=true", "training.sample_bytes=0",
        "data.valid_fraction=0.1", "training.shard_size=0",
    ]
    for i, stage in enumerate(recipe.model.stages):
        overrides.append(f"model.stages[{i}].layers={min(stage.layers, DEPTH)}")
        if stage.decoder_layers is not None:
            overrides.append(f"model.stages[{i}].decoder_layers={min(stage.decoder_layers, DEPTH)}")
    if dry:
        lengths = [-(-s.max_len // 4) for s in recipe.model.stages]
        overrides += [f"model.seq_len={lengths[0]}"] + [f"model.stages[{i}].max_len={n}" for i, n in enumerate(lengths)]
    return load_recipe(path, overrides)


def one_rank_group(device: torch.device) -> None:
    """A process group of this process alone: training shards with FSDP2 over it, as over a cluster."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, store=dist.HashStore(),
                            device_id=device if device.type == "cuda" else None)


def check_training(name: str, device: torch.device, steps: int, peak: float | None, dry: bool, out: Path) -> dict:
    """``steps`` steps of the reduced recipe by the real Trainer (FSDP2 over one rank), the last one evaluated
    and checkpointed in the background; memory, step time and MFU against the plan."""
    from torch._dynamo.utils import counters

    recipe = reduced_recipe(name, dry, steps)
    counters.clear()
    one_rank_group(device)
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # running on eagerly is a failure here
            trainer = Trainer.setup(recipe, out, World(0, 1, 0, device), False, False, False)
            run = trainer.resolved
            batches = step_batches(trainer.data, 0, steps)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            losses, times = [], []
            trainer.logger.start()
            for number in range(1, steps + 1):
                batch = next(batches).to(device)
                start = time.perf_counter()
                output = trainer.step(number, batch)
                trainer.logger.accumulate(output)
                losses.append(float(output.loss))  # synchronises
                times.append(time.perf_counter() - start)
            record = trainer.log(steps, output)  # evaluation included
            trainer.checkpointer.save(steps)
            trainer.close()
    finally:
        dist.destroy_process_group()
    plan = run.plan
    timed = times[2:] or times[-1:]  # the first steps compile and warm up
    step_s = statistics.median(timed)
    rows = run.budget.batch_size
    flops = rows * run.budget.flops_per_byte * run.budget.seq_len * run.budget.bytes_per_token
    result = {
        "recipe": name, "parameters": run.params, "seq_len": run.budget.seq_len, "batch": rows,
        "micro_batch": run.split.micro_batch, "accumulation": run.split.accumulation,
        "checkpointing": run.parallelism.checkpointing, "parallelism": run.parallelism.describe(), "steps": steps,
        "losses": losses, "val_bpb": record.get("val_bpb"), "step_s": step_s, "first_step_s": times[0],
        "bytes_per_s": rows * run.budget.seq_len * run.budget.bytes_per_token / step_s,
        "planned_bytes": plan.total, "planned_step_s": plan.step_time, "planned_mfu": plan.mfu,
        "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
        "checkpoint_step": saved_step(out),
    }
    if peak:
        result["mfu"] = flops / step_s / peak
    problems = []
    if result["graph_breaks"]:
        problems.append(f"{result['graph_breaks']} graph breaks: {dict(counters['graph_break'])}")
    if not dry and not result["graphs"]:
        problems.append("no graph was compiled: the step ran eagerly")
    if device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(device)
        result |= {"measured_bytes": measured, "measured_over_planned": measured / plan.total}
        if abs(measured - plan.total) > MEMORY_TOLERANCE * plan.total:
            problems.append(f"peak memory {measured / 2**30:.2f} GiB is {measured / plan.total - 1:+.0%} off the "
                            f"plan's {plan.total / 2**30:.2f} GiB (tolerance {MEMORY_TOLERANCE:.0%})")
    if not all(map(torch.isfinite, map(torch.tensor, losses))):
        problems.append(f"loss not finite: {losses}")
    if result["checkpoint_step"] != steps:
        problems.append(f"the background checkpoint holds step {result['checkpoint_step']}, not {steps}")
    if problems:
        raise CheckFailed("; ".join(problems), result)
    return result


def torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "unetlm.cli", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_sigterm(device: torch.device, work: Path, timeout: float = 240.0) -> dict:
    """A one-process torchrun job gets SIGTERM once it has logged a few steps: it must leave a checkpoint
    of a step it reached, and the same command again with ``--resume auto`` must finish the run."""
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "au2.toml", data_overrides() + [
        "training.steps=400", "training.checkpoint_every=1000", "training.eval_every=1000", "training.sample_bytes=0",
        f'training.device="{device.type}"', "training.compile=false", "training.async_checkpoint=true",
    ])
    recipe_file, run_dir = work / "sigterm.toml", work / "sigterm-run"
    recipe_file.write_text(dump_recipe(recipe), encoding="utf-8")
    command = ["train", str(recipe_file), "--out", str(run_dir), "--quiet", "--resume", "auto"]
    job = torchrun(command, work)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while job.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.2)
    reached = len(read_metrics(metrics)) if metrics.exists() else 0
    job.send_signal(signal.SIGTERM)
    log, _ = job.communicate(timeout=timeout)
    result = {"signalled_after_step": reached, "exit_status": job.returncode,
              "checkpoint_step": saved_step(run_dir)}
    saved = result["checkpoint_step"]
    if saved is None or saved < reached:
        raise CheckFailed(f"SIGTERM after step {reached} left {'no checkpoint' if saved is None else 'an older one'}"
                          f"; the job's output ended: {log[-500:]!r}", result)
    again = torchrun(command, work)
    log, _ = again.communicate(timeout=timeout)
    result |= {"resumed_exit_status": again.returncode, "final_step": saved_step(run_dir)}
    if again.returncode != 0 or result["final_step"] != recipe.training.steps:
        raise CheckFailed(f"the resumed job did not finish: {log[-500:]!r}", result)
    return result


def check_flex_attention(device: torch.device, dry: bool) -> dict:
    """FlexAttention equals SDPA (sliding window + two documents + rotary), outputs and gradients;
    eager, and compiled on CUDA."""
    from unetlm.mixers.attention import AttentionBlock, AttentionConfig

    B, L, dim, window = (2, 128, 64, 16) if dry else (2, 2048, 512, 256)
    torch.manual_seed(0)
    blocks = {b: AttentionBlock(AttentionConfig(head_dim=32 if dry else 64, window=window, backend=b), dim).to(device)
              for b in ("sdpa", "flex")}
    blocks["flex"].load_state_dict(blocks["sdpa"].state_dict())
    x = torch.randn(B, L, dim, device=device)
    doc = torch.zeros(B, L, dtype=torch.long, device=device)
    doc[:, L // 3 :] = 1
    doc[1, 2 * L // 3 :] = 2
    info = byte_stage(doc, torch.ones(B, L, dtype=torch.bool, device=device))
    backward = device.type == "cuda"  # FlexAttention has no backward on the CPU

    def run(block):
        xi = x.clone().requires_grad_(backward)
        y = block(xi, info, {})
        if not backward:
            return y.detach(), None
        y.square().mean().backward()
        grad = xi.grad
        block.zero_grad(set_to_none=True)
        return y.detach(), grad

    ref_y, ref_g = run(blocks["sdpa"])
    variants = {"eager": blocks["flex"]}
    if device.type == "cuda":
        variants["compiled"] = torch.compile(blocks["flex"], dynamic=False)
    result = {"shape": [B, L, dim], "window": window, "backward": backward}
    for label, block in variants.items():
        with torch.no_grad() if not backward else torch.enable_grad():
            y, g = run(block)
        result[f"{label}_max_abs_diff"] = float((y - ref_y).abs().max())
        if g is not None:
            result[f"{label}_grad_max_abs_diff"] = float((g - ref_g).abs().max())
    worst = max(v for k, v in result.items() if k.endswith("diff"))
    result["tolerance"] = 1e-3
    if worst > 1e-3:
        raise RuntimeError(f"FlexAttention differs from SDPA by {worst:.3g}: {result}")
    return result


def check_mamba(device: torch.device) -> dict:
    """The plain-PyTorch Mamba-2 block against mamba_ssm's kernels, same weights."""
    from unetlm.mixers.mamba import MambaBlock, MambaConfig

    torch.manual_seed(0)
    B, L, dim = 2, 1024, 256
    blocks = {b: MambaBlock(MambaConfig(backend=b), dim).to(device) for b in ("torch", "cuda")}
    blocks["cuda"].load_state_dict(blocks["torch"].state_dict())
    x = torch.randn(B, L, dim, device=device)
    doc = torch.zeros(B, L, dtype=torch.long, device=device)
    doc[:, L // 2 :] = 1
    info = byte_stage(doc, torch.ones(B, L, dtype=torch.bool, device=device))
    with torch.no_grad():
        ref, out = (blocks[b](x, info, {}) for b in ("torch", "cuda"))
    diff = float((ref - out).abs().max())
    if diff > 1e-2:
        raise RuntimeError(f"Mamba block differs from mamba_ssm by {diff:.3g}")
    return {"shape": [B, L, dim], "max_abs_diff": diff}


class CheckFailed(RuntimeError):
    """A check ran and found a problem; ``figures``: what it measured."""

    def __init__(self, message: str, figures: dict) -> None:
        super().__init__(message)
        self.figures = figures


def skipped(reason: str) -> dict:
    print(f"  skipped: {reason}", flush=True)
    return {"status": "skipped", "reason": reason}


def run_check(name: str, fn) -> dict:
    print(f"{name} ...", flush=True)
    start = time.perf_counter()
    try:
        result = {"status": "ok", **fn()}
    except CheckFailed as exc:
        result = {"status": "failed", "error": str(exc), **exc.figures}
    except Exception as exc:  # noqa: BLE001 - a failed check is recorded and the others still run
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.perf_counter() - start
    shown = {k: v for k, v in result.items() if k not in ("losses",)}
    print(f"  {shown}", flush=True)
    return result


CHECKS = ("train_au4", "torchrun_sigterm", "flex_vs_sdpa", "mamba_vs_mamba_ssm")


def gpu_check(out: Path, dry: bool, steps: int, peak_tflops: float | None, only: tuple[str, ...] = CHECKS) -> dict:
    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        print("no CUDA device: running the dry mode (tiny sizes on the CPU)", flush=True)
    dry = not cuda
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    peak = None
    if cuda:
        peak = peak_tflops * 1e12 if peak_tflops else cuda_hardware(device, 1).peak_flops
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)", "dry_run": dry,
        "torch": torch.__version__, "unetlm": unetlm.__version__, "peak_flops": peak, "checks": {},
    }
    checks = report["checks"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if "train_au4" in only:
            checks["train_au4"] = run_check(
                "train au4", lambda: check_training("au4", device, steps, peak, dry, work / "au4"))
        if "torchrun_sigterm" in only:
            checks["torchrun_sigterm"] = run_check("torchrun sigterm", lambda: check_sigterm(device, work))
    if "flex_vs_sdpa" in only:
        checks["flex_vs_sdpa"] = run_check("flex vs sdpa", lambda: check_flex_attention(device, dry))
    if "mamba_vs_mamba_ssm" in only:
        print("mamba vs mamba_ssm ...", flush=True)
        try:
            import mamba_ssm  # noqa: F401

            have_kernels = cuda
        except ImportError:
            have_kernels = False
        if have_kernels:
            checks["mamba_vs_mamba_ssm"] = run_check("mamba vs mamba_ssm", lambda: check_mamba(device))
        else:
            checks["mamba_vs_mamba_ssm"] = skipped("needs CUDA and the mamba_ssm package")
    if not cuda:
        print("  CUDA-only parts skipped: NCCL, compile, FlexAttention backward and compiled flex, MFU, peak memory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    tmp.replace(out)
    print(json.dumps(summary(report), indent=2))
    print(f"wrote {out}")
    return report


def summary(report: dict) -> dict:
    """The figures to read first: each check's status, and training's measured against planned figures."""
    train = report["checks"].get("train_au4", {})
    keys = ("measured_bytes", "planned_bytes", "step_s", "planned_step_s", "mfu", "planned_mfu", "graph_breaks")
    return {"status": {k: v["status"] for k, v in report["checks"].items()}} | {k: train[k] for k in keys if k in train}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unetlm.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--json", default="gpu-check.json", help="file to write the figures to")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, CUDA-only checks skipped")
    p.add_argument("--steps", type=int, default=6, help="training steps (the first two are not timed)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak per GPU (default: by device name)")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks to run (default: all: {', '.join(CHECKS)})")
    args = p.parse_args(argv)
    only = tuple(c.strip() for c in args.only.split(",") if c.strip())
    unknown = sorted(set(only) - set(CHECKS))
    if unknown or args.steps < 1:
        what = f"--only {','.join(unknown)} is invalid: choose from {', '.join(CHECKS)}" if unknown else (
            f"--steps {args.steps} is invalid: it must be positive")
        print(f"gpu_check: error: {what}", file=sys.stderr)
        return 2
    report = gpu_check(Path(args.json), args.dry_run, args.steps, args.peak_tflops, only)
    failed = [k for k, v in report["checks"].items() if v["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
