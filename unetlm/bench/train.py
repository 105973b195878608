"""``unetlm bench train``: training bytes/s and model FLOP utilisation, against a plain reference.

Each recipe runs in up to three modes (:func:`unetlm.train.parallelize.compile_regions`):
``eager``; ``compiled``, one ``torch.compile`` of the whole forward, as one training process
compiles it; ``regions``, compiled as an FSDP2 run compiles it (blocks, transitions, embedding,
head and loss as regions of their own, the embedding and the head being units), in one process
and unsharded, to compare the two layouts. Beside it, the
same run measures :class:`Reference`, a plain causal transformer written here (SDPA with
``is_causal``, no document or window masks) with the shapes of the recipe's byte stage: eager,
and compiled whole when a compiled mode runs. The timed steps alternate between the variants
(one step of each in turn, each round starting one variant later), so a machine whose speed
drifts slows them alike; each record carries every step time (``step_s``), bytes/s comes from the
median step, and the table's ratios are medians of the rounds' paired ratios.

MFU = (training FLOPs per byte x bytes/s) / matmul peak, the peak measured in the same run on the
same device (square matmuls, best of several trials), in bfloat16 (``mfu``) and float32
(``mfu_fp32``). A step is forward + backward + clipping + AdamW, as in training; the batches are
real packed data from the recipe's source. ``training.threads`` sets the torch threads, as in
training (``--set training.threads=1``). Peak memory: CUDA's max allocated over the variant's
steps, or on CPU the process's peak resident set (which only grows, so it covers every variant).
"""
from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import attrs
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from unetlm.api import build_model
from unetlm.core.tokens import PAD
from unetlm.data.sources import load_documents
from unetlm.data.windows import TrainingData
from unetlm.mixers.attention import mean_context
from unetlm.mixers.mlp import swiglu_hidden
from unetlm.model.summary import summarize
from unetlm.recipe import load_recipe
from unetlm.train.loop import forward_loss
from unetlm.train.resolve import autocast_dtype
from unetlm.train.optim import make_optimizer
from unetlm.train.distributed import pick_device
from unetlm.train.parallelize import compile_regions
from unetlm.train.scaling import resolve_budget

BENCH_DATA_BYTES = 400_000
MODES = ("eager", "compiled", "regions")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, trials: int = 5) -> float:
    """Best achieved FLOP/s of an n x n matmul (n = 4096 on CUDA, 1024 on CPU)."""
    n = n or (4096 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(device)
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - start))
    return best


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---- the reference ----


@attrs.frozen
class ReferenceShape:
    """A plain causal transformer's shapes: those of a recipe's byte stage."""

    dim: int
    layers: int
    heads: int
    head_dim: int
    hidden: int  # SwiGLU hidden width
    vocab: int
    seq_len: int

    @classmethod
    def of(cls, model) -> "ReferenceShape":
        """The byte stage of ``model``: its width, attention heads and feed-forward, and all its
        layers (encoder and decoder, or the one stack of a one-stage model)."""
        stacks = [model.encoders[0], model.decoders[0]] if model.encoders else [model.middle]
        dim = model.spec.stages[0].dim
        config = model.spec.stages[0].mixer.config
        head_dim = getattr(config, "head_dim", 64)
        heads = config.n_heads(dim) if hasattr(config, "n_heads") else dim // head_dim
        hidden = config.mlp_hidden(dim) if hasattr(config, "mlp_hidden") else swiglu_hidden(dim, 4.0)
        layers = sum(len(s.blocks) for s in stacks)
        return cls(dim, layers, heads, head_dim, hidden, model.spec.vocab_size, model.lengths[0])

    def train_flops_per_byte(self) -> float:
        """Training FLOPs per position, counted as :mod:`unetlm.model.summary` counts (3 x forward)."""
        inner = self.heads * self.head_dim
        L = self.seq_len
        layer = 2.0 * (self.dim * 3 * inner + inner * self.dim + 3 * self.dim * self.hidden)
        layer += 4.0 * inner * mean_context(L, 0)
        return 3.0 * (self.layers * layer + 2.0 * self.dim * self.vocab)


class ReferenceBlock(nn.Module):
    def __init__(self, shape: ReferenceShape) -> None:
        super().__init__()
        inner = shape.heads * shape.head_dim
        self.heads = shape.heads
        self.norm1, self.norm2 = nn.RMSNorm(shape.dim, eps=1e-6), nn.RMSNorm(shape.dim, eps=1e-6)
        self.qkv = nn.Linear(shape.dim, 3 * inner, bias=False)
        self.out = nn.Linear(inner, shape.dim, bias=False)
        self.fc1 = nn.Linear(shape.dim, 2 * shape.hidden, bias=False)
        self.fc2 = nn.Linear(shape.hidden, shape.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(y.transpose(1, 2).reshape(B, L, -1))
        value, gate = self.fc1(self.norm2(x)).chunk(2, dim=-1)
        return x + self.fc2(F.silu(gate) * value)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Reference(nn.Module):
    """A causal transformer over one sequence per row: embedding, pre-norm blocks with rotary SDPA
    (``is_causal``) and a SwiGLU feed-forward, norm, head, cross-entropy. No documents, no windows."""

    def __init__(self, shape: ReferenceShape) -> None:
        super().__init__()
        self.embed = nn.Embedding(shape.vocab, shape.dim)
        self.blocks = nn.ModuleList(ReferenceBlock(shape) for _ in range(shape.layers))
        self.norm = nn.RMSNorm(shape.dim, eps=1e-6)
        self.head = nn.Linear(shape.dim, shape.vocab, bias=False)
        inv = 1.0 / 10000.0 ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32) / shape.head_dim)
        angles = torch.outer(torch.arange(shape.seq_len, dtype=torch.float32), inv)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, self.cos[:L], self.sin[:L])
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=PAD)


# ---- variants and the alternating timer ----


@attrs.define
class Variant:
    """One model of the run and how a step trains it."""

    name: str  # the recipe's name, or "reference"
    mode: str  # eager, compiled or regions (the reference: eager or compiled)
    model: nn.Module
    optimizer: torch.optim.Optimizer
    flops_per_byte: float
    loss: object  # batch -> loss
    times: list = attrs.field(factory=list)
    peak: int = 0

    def step(self, batch, clip: float) -> None:
        loss = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()


def recipe_variants(recipe, modes, device: torch.device, dtype, lr: float, reference: bool) -> list[Variant]:
    """The recipe's model in each mode (the same initial weights), and the reference eager and,
    when a compiled mode runs, compiled whole."""
    spec = recipe.training
    variants = []
    for mode in modes:
        torch.manual_seed(spec.seed)
        model = build_model(recipe).to(device)
        flops = summarize(model).train_flops_per_byte
        optimizer = make_optimizer(model, spec, lr)
        if mode != "eager":
            compile_regions(model, sharded=mode == "regions")
        variants.append(Variant(recipe.name, mode, model, optimizer, flops,
                                lambda b, m=model: forward_loss(m, b, dtype).objective))
    if reference:
        shape = ReferenceShape.of(variants[0].model)
        for mode in ("eager", "compiled") if any(m != "eager" for m in modes) else ("eager",):
            torch.manual_seed(spec.seed)
            model = Reference(shape).to(device)
            if mode == "compiled":
                model.compile(dynamic=False)
            variants.append(Variant("reference", mode, model, make_optimizer(model, spec, lr),
                                    shape.train_flops_per_byte(), lambda b, m=model: _reference_loss(m, b, dtype)))
    return variants


def _reference_loss(model: Reference, batch, dtype) -> torch.Tensor:
    with torch.autocast(batch.tokens.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        return model(batch.tokens, batch.targets)


def time_alternating(variants: list[Variant], batches: list, warmup: int, clip: float, device) -> None:
    """Warm each variant up (compilation happens there), then time one step of each in turn, each
    round starting one variant later than the one before."""
    for variant in variants:
        for batch in batches[:warmup]:
            variant.step(batch, clip)
    for i, batch in enumerate(batches[warmup:]):
        for variant in variants[i % len(variants) :] + variants[: i % len(variants)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            variant.step(batch, clip)
            _sync(device)
            variant.times.append(time.perf_counter() - start)
            variant.peak = max(variant.peak, peak_memory(device))


def bench_recipe(recipe, modes, steps: int, warmup: int, device: torch.device, peaks: dict,
                 reference: bool = True) -> list[dict]:
    """Records of ``recipe`` in each of ``modes`` and of its reference, timed side by side."""
    spec = recipe.training
    torch.manual_seed(spec.seed)
    probe = build_model(recipe)
    flops_per_byte = summarize(probe).train_flops_per_byte
    budget = resolve_budget(spec.batch_size, spec.lr, spec.steps, recipe.model.seq_len, flops_per_byte)
    docs = load_documents(attrs.evolve(recipe.data, max_bytes=recipe.data.max_bytes or BENCH_DATA_BYTES))
    limits = probe.lengths[1 : 1 + len(probe.splitters)]
    data = TrainingData.from_documents(
        docs, probe.splitters, limits, recipe.model.seq_len, budget.batch_size, 0.1, spec.seed
    )
    dtype = autocast_dtype(spec, device)
    batches = [data.train_batch(s).to(device) for s in range(warmup + steps)]
    variants = recipe_variants(recipe, modes, device, dtype, budget.lr, reference)
    time_alternating(variants, batches, warmup, spec.grad_clip or float("inf"), device)
    step_bytes = budget.batch_size * recipe.model.seq_len
    records = []
    for v in variants:
        bytes_per_s = step_bytes / statistics.median(v.times)
        flops_per_s = bytes_per_s * v.flops_per_byte
        records.append({
            "recipe": recipe.name,
            "model": v.name,
            "mode": v.mode,
            "device": str(device),
            "dtype": "bfloat16" if dtype else "float32",
            "params": sum(p.numel() for p in v.model.parameters()),
            "batch_size": budget.batch_size,
            "seq_len": recipe.model.seq_len,
            "steps": steps,
            "threads": torch.get_num_threads(),
            "step_s": v.times,
            "bytes_per_s": bytes_per_s,
            "flops_per_byte": v.flops_per_byte,
            "flops_per_s": flops_per_s,
            "mfu": flops_per_s / peaks["bfloat16"],
            "mfu_fp32": flops_per_s / peaks["float32"],
            "peak_bf16_flops": peaks["bfloat16"],
            "peak_fp32_flops": peaks["float32"],
            "peak_mem_bytes": v.peak,
        })
    return records


def bench_train(
    recipes: list[str | Path],
    json_out: str | Path | None = None,
    modes: tuple[str, ...] = MODES,
    steps: int = 10,
    warmup: int = 2,
    overrides: list[str] | tuple[str, ...] = (),
    device: str = "auto",
    reference: bool = True,
) -> list[dict]:
    """Records of every (recipe, mode) and of each recipe's reference; written as a JSON list to
    ``json_out`` when given (after each recipe)."""
    loaded = [load_recipe(r, overrides) for r in recipes]
    threads = {r.training.threads for r in loaded if r.training.threads}
    if len(threads) > 1:
        raise ValueError(f"the recipes set different training.threads {sorted(threads)}; set one with --set")
    if threads:  # as in training; otherwise torch's default (OMP_NUM_THREADS, else every core)
        torch.set_num_threads(threads.pop())
    dev = pick_device(device)
    peaks = {name: matmul_peak(dev, dt) for name, dt in (("bfloat16", torch.bfloat16), ("float32", torch.float32))}
    records = []
    for recipe in loaded:
        torch._dynamo.reset()  # each recipe's graphs start from an empty cache
        records += bench_recipe(recipe, modes, steps, warmup, dev, peaks, reference)
        if json_out is not None:
            Path(json_out).write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return records


def format_table(records: list[dict]) -> str:
    """One line per record. ``vs ref``: achieved FLOP/s over the reference's (compiled modes against
    the compiled reference; for a one-stage recipe the same FLOPs per byte, so the bytes/s ratio);
    ``vs compiled``: the regions' bytes/s over the same model compiled whole. Both are medians of
    the ratios of steps timed one after the other (:func:`paired_ratio`), which a machine whose
    speed drifts through the run affects least."""
    lines = [f"{'recipe':<14}{'model':<11}{'mode':<10}{'params':>11}{'bytes/s':>11}{'MFLOP/byte':>11}"
             f"{'GFLOP/s':>9}{'MFU fp32':>9}{'vs ref':>8}{'vs compiled':>12}{'peak MiB':>9}"]
    for r in records:
        same = [o for o in records if o["recipe"] == r["recipe"] and o["seq_len"] == r["seq_len"]]
        ref = {o["mode"]: o for o in same if o["model"] == "reference"}
        whole = {o["model"]: o for o in same if o["mode"] == "compiled"}
        versus_ref = versus_whole = "-"
        if r["model"] != "reference":
            other = ref.get("eager" if r["mode"] == "eager" else "compiled")
            versus_ref = f"{paired_ratio(r, other, flops=True):.2f}x" if other else "-"
            other = whole.get(r["model"]) if r["mode"] == "regions" else None
            versus_whole = f"{paired_ratio(r, other):.2f}x" if other else "-"
        lines.append(
            f"{r['recipe'] or '-':<14}{r['model'] or 'recipe':<11}{r['mode']:<10}{r['params']:>11,}"
            f"{r['bytes_per_s']:>11,.0f}{r['flops_per_byte'] / 1e6:>11.2f}{r['flops_per_s'] / 1e9:>9.2f}"
            f"{r['mfu_fp32']:>9.1%}{versus_ref:>8}{versus_whole:>12}{r['peak_mem_bytes'] / 2**20:>9.0f}"
        )
    if records:
        r = records[0]
        lines.append(f"matmul peak on {r['device']}: bf16 {r['peak_bf16_flops'] / 1e9:.1f} GFLOP/s, "
                     f"fp32 {r['peak_fp32_flops'] / 1e9:.1f} GFLOP/s; bytes/s from the median step")
    return "\n".join(lines)


def paired_ratio(record: dict, other: dict, flops: bool = False) -> float:
    """The median over timed rounds of ``record``'s speed over ``other``'s in the same round (bytes
    per second, or with ``flops`` FLOPs per second)."""
    scale = record["flops_per_byte"] / other["flops_per_byte"] if flops else 1.0
    return statistics.median(scale * b / a for a, b in zip(record["step_s"], other["step_s"]))
