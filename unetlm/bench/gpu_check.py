"""The GPU check: a few training steps of AU-Net 2 and 3 at full width, FlexAttention against SDPA,
the Mamba mixer against ``mamba_ssm``, MFU and the planner's memory against the allocator's peak.

``python -m unetlm.bench.gpu_check --json OUT`` (what ``scripts/gpu-check.sh`` runs). Without CUDA
(or with ``--dry-run``) it runs the same code on tiny sizes on the CPU, eager, and skips the
CUDA-only checks with a message, so a test exercises it cheaply. Every check records its figures
or its error in the JSON; the exit status is 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from unetlm.api import build_model
from unetlm.core.layout import byte_stage
from unetlm.data.packing import Batch
from unetlm.model.summary import summarize
from unetlm.recipe import load_recipe
from unetlm.train import loop, plan
from unetlm.train.activations import measure_activations
from unetlm.train.hardware import Hardware, cuda_hardware, hardware_for
from unetlm.train.optim import make_optimizer
from unetlm.train.parallel import World
from unetlm.train.parallelize import parallelize, plan_parallelism

DEPTH = 4  # layers per stack at full width: enough blocks to measure, few enough to compile quickly
ROOT = Path(__file__).resolve().parents[2]
TEXT_FILES = [d / "shared" / "data" / "tinyshakespeare.txt" for d in (ROOT, ROOT.parent)]
FALLBACK_TEXT = b"First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.\n"


def reduced_recipe(name: str, dry: bool):
    """recipes/NAME.toml at full width with at most DEPTH layers per stack, compiled, checkpointed,
    bf16; dry: recipes/tiny/NAME.toml four times shorter, eager."""
    path = ROOT / "recipes" / ("tiny" if dry else "") / f"{name}.toml"
    recipe = load_recipe(path)
    overrides = [
        "training.activation_checkpointing=true", 'training.dtype="bfloat16"', f"training.compile={str(not dry).lower()}",
        "training.batch_size=8", "training.lr=1e-3",
    ]
    for i, stage in enumerate(recipe.model.stages):
        overrides.append(f"model.stages[{i}].layers={min(stage.layers, DEPTH)}")
        if stage.decoder_layers is not None:
            overrides.append(f"model.stages[{i}].decoder_layers={min(stage.decoder_layers, DEPTH)}")
    if dry:
        lengths = [-(-s.max_len // 4) for s in recipe.model.stages]
        overrides += [f"model.seq_len={lengths[0]}"] + [f"model.stages[{i}].max_len={n}" for i, n in enumerate(lengths)]
    return load_recipe(path, overrides)


def text_batch(model, rows: int, seq_len: int, device) -> Batch:
    text = next((f.read_bytes() for f in TEXT_FILES if f.exists()), FALLBACK_TEXT)
    text = (text * (rows * seq_len // max(len(text), 1) + 2))[: rows * seq_len + 1]
    flat = torch.tensor(list(text), dtype=torch.long)
    tokens, targets = flat[:-1].view(rows, seq_len), flat[1:].view(rows, seq_len)
    doc = torch.zeros_like(tokens)
    return Batch(tokens, doc, model.split(tokens, doc), targets).to(device)


def check_training(name: str, device: torch.device, steps: int, peak: float | None, dry: bool) -> dict:
    """Train ``steps`` steps of the reduced recipe at the micro-batch the planner picks for this device."""
    recipe = reduced_recipe(name, dry)
    seq_len = recipe.model.seq_len
    with torch.device("meta"):
        layout = plan.parameter_layout(build_model(recipe))
    profile = measure_activations(recipe.model)
    hardware = hardware_for(device, 1)
    hardware = Hardware(1, hardware.memory, peak, hardware.name)
    model = build_model(recipe)
    flops_per_sequence = summarize(model).train_flops_per_token * seq_len
    chosen = plan.choose_plan(hardware, layout, profile, 8, seq_len, flops_per_sequence, "auto", True)
    rows = chosen.micro_batch
    predicted = plan.Plan(hardware, layout, profile, rows, seq_len, flops_per_sequence, True, rows, 1)
    model.to(device)
    world = World(0, 1, 0, device)
    parallel_plan = plan_parallelism(recipe.training, world, True, bool(recipe.training.compile), torch.bfloat16)
    parallelize(model, parallel_plan, world)  # checkpointing, then compile regions, as training applies them
    optimizer = make_optimizer(model, recipe.training, 1e-3)
    batch = text_batch(model, rows, seq_len, device)
    lengths = torch.as_tensor(model.tokenizer.lengths, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = loop.forward_backward(model, batch, 0, torch.bfloat16, lengths, parallel_plan)
        optimizer.step()
        losses.append(float(out.loss))  # synchronises
        times.append(time.perf_counter() - start)
    timed = times[2:] or times[-1:]  # the first steps compile and warm up
    step_s = sum(timed) / len(timed)
    result = {
        "recipe": name, "parameters": layout.total, "seq_len": seq_len, "rows": rows, "steps": steps,
        "losses": losses, "step_s": step_s, "bytes_per_s": rows * seq_len / step_s,
        "compile_and_first_step_s": times[0], "predicted_bytes": predicted.total,
        "predicted_activation_bytes_per_sequence": profile.per_row(True),
    }
    if peak:
        result["mfu"] = rows * flops_per_sequence / step_s / peak
    if device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(device)
        result |= {"measured_bytes": measured, "predicted_over_measured": predicted.total / measured}
    if not all(map(torch.isfinite, map(torch.tensor, losses))):
        raise RuntimeError(f"loss not finite: {losses}")
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


def skipped(reason: str) -> dict:
    print(f"  skipped: {reason}", flush=True)
    return {"status": "skipped", "reason": reason}


def run_check(name: str, fn) -> dict:
    print(f"{name} ...", flush=True)
    start = time.perf_counter()
    try:
        result = {"status": "ok", **fn()}
    except Exception as exc:  # noqa: BLE001 - a failed check is recorded and the others still run
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.perf_counter() - start
    shown = {k: v for k, v in result.items() if k not in ("losses",)}
    print(f"  {shown}", flush=True)
    return result


def gpu_check(out: Path, dry: bool, steps: int, peak_tflops: float | None) -> dict:
    cuda = torch.cuda.is_available() and not dry
    if not cuda and not dry:
        print("no CUDA device: running the dry mode (tiny sizes on the CPU)", flush=True)
    dry = not cuda
    device = torch.device("cuda" if cuda else "cpu")
    peak = None
    if cuda:
        peak = peak_tflops * 1e12 if peak_tflops else cuda_hardware(device, 1).peak_flops
    report = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)", "dry_run": dry,
        "torch": torch.__version__, "peak_flops": peak, "checks": {},
    }
    checks = report["checks"]
    for name in ("au2", "au3"):
        checks[f"train_{name}"] = run_check(f"train {name}", lambda n=name: check_training(n, device, steps, peak, dry))
    checks["flex_vs_sdpa"] = run_check("flex vs sdpa", lambda: check_flex_attention(device, dry))
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
        print("  CUDA-only parts skipped: compile, FlexAttention backward and compiled flex, MFU, peak memory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unetlm.bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--json", default="gpu-check.json", help="file to write the figures to")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, CUDA-only checks skipped")
    p.add_argument("--steps", type=int, default=6, help="training steps per recipe (the first two are not timed)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak per GPU (default: by device name)")
    args = p.parse_args(argv)
    report = gpu_check(Path(args.json), args.dry_run, args.steps, args.peak_tflops)
    failed = [k for k, v in report["checks"].items() if v["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
