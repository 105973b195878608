"""The plan: what one device holds and does per optimizer step, before any weight exists.

Activations are measured on fake tensors (:mod:`unetlm.train.activations`), devices described by
:mod:`unetlm.train.hardware`, the FSDP2 units listed by :func:`unetlm.train.parallelize.shard_units`.
It models what training does (:mod:`unetlm.train.parallelize`, ``forward_backward`` in
:mod:`unetlm.train.loop`), per GPU, with N processes in replica groups of ``shard_size`` (HSDP;
``shard_size`` = N is plain FSDP2) and AdamW:

- fp32 parameters, gradients and the two moments, sharded ``1/shard_size``;
- FSDP2 buffers: gathered parameters (bf16 under autocast) of the units held from their forward to
  their backward and of the two largest others (one computing, the next prefetched); unsharded
  gradients of the root and the largest other unit, the largest one's reduce-scatter input in the
  reduction dtype; with HSDP and several micro-batches, the reduce-scattered gradients summed over
  the micro-batches until the last one's all-reduce;
- activations of one micro-batch, and per-stage extra buffers.

Per micro-batch the units are all-gathered for the forward and again for the backward (those held,
once) and the gradients reduce-scattered within the shard group; across replicas they are
all-reduced once per step, in the last micro-batch's backward. A collective runs over NVLink when
its group stays in a node, else over InfiniBand. FSDP2 overlaps them with compute (all-gathers with
the pass that needs them, prefetched; reductions with the rest of the backward); not hidden: the
gathers before the first block computes, the root's reductions after the last, and the optimizer
step (HBM-bound).
"""
from __future__ import annotations

import attrs

from unetlm.train.activations import ActivationProfile
from unetlm.train.hardware import GIB, USABLE_FRACTION, Hardware
from unetlm.train.parallelize import shard_units, unit_parameters
from unetlm.train.scaling import split_batch

KERNEL_EFFICIENCY = 0.5  # achieved fraction of the bf16 peak in the estimate of the compute time
# HBM bytes per local parameter of the optimizer step: fused AdamW reads parameter, gradient and two
# moments and writes three (28); clipping reads the gradients for their norm and scales them (12)
OPTIMIZER_BYTES_PER_PARAMETER = 40


class PlanError(ValueError):
    """The configuration cannot fit; the message holds the numbers and what to change."""


@attrs.frozen
class UnitSize:
    """One FSDP2 unit as the planner sees it: its name ("" is the root), the parameters it owns, and
    whether its gathered parameters are freed after the forward."""

    name: str
    params: int
    resharded: bool


@attrs.frozen
class UnitSizes:
    """Parameter counts of the model's FSDP2 units (those :func:`~unetlm.train.parallelize.shard_units`
    wraps), the root last."""

    units: tuple[UnitSize, ...]

    @property
    def total(self) -> int:
        return sum(u.params for u in self.units)

    @property
    def root(self) -> int:
        return self.units[-1].params

    @property
    def held(self) -> int:
        """Parameters gathered from the forward until their backward (units not resharded)."""
        return sum(u.params for u in self.units if not u.resharded)

    @property
    def largest(self) -> int:
        """The largest resharded unit."""
        return max((u.params for u in self.units if u.resharded), default=0)

    @property
    def in_flight(self) -> int:
        """Parameters of the two largest resharded units: one computing, the next prefetched."""
        return sum(sorted((u.params for u in self.units if u.resharded), reverse=True)[:2])

    @property
    def reducing(self) -> int:
        """Unsharded gradients at once in the backward: the root's (reduced last) and the largest
        other unit's."""
        *others, root = self.units
        return root.params + max((u.params for u in others), default=0)


def unit_sizes(model) -> UnitSizes:
    """The FSDP2 units of ``model`` (any device, meta included) as training shards them."""
    units = shard_units(model)
    return UnitSizes(tuple(UnitSize(u.name, n, u.reshard_after_forward) for u, n in zip(units, unit_parameters(units))))


@attrs.frozen
class ExtraBuffer:
    """Memory a stage keeps during a step besides parameters, optimizer state and what autograd
    saves (e.g. attention masks): ``fixed + rows * per_row`` bytes for a micro-batch of ``rows``."""

    name: str
    fixed: int = 0
    per_row: int = 0


@attrs.frozen
class Timing:
    """Seconds of one optimizer step on one device, and the links its collectives use."""

    compute: float  # forward and backward (recomputation included) at KERNEL_EFFICIENCY of the peak
    exposed: float  # communication not hidden behind compute
    optimizer: float
    shard_link: str
    shard_bandwidth: float  # achieved bytes/s
    replica_link: str
    replica_bandwidth: float

    @property
    def total(self) -> float:
        return self.compute + self.exposed + self.optimizer


@attrs.frozen
class Plan:
    """What one device holds and does per optimizer step; bytes unless said otherwise."""

    hardware: Hardware
    units: UnitSizes
    activations: ActivationProfile
    global_batch: int
    seq_len: int
    flops_per_sequence: float  # training FLOPs (forward + backward) of one sequence
    checkpointing: bool
    micro_batch: int
    accumulation: int
    shard_size: int = 1  # ranks a parameter is sharded over; the rest replicate (HSDP)
    param_bytes: int = 2  # per gathered parameter: bf16 under autocast, else fp32
    reduce_bytes: int = 4  # per gradient element in reductions (training.reduce_dtype)
    extra: tuple[ExtraBuffer, ...] = ()
    # shard_size "auto": (shard size, fits, estimated step s or None) of each shard size tried
    considered: tuple[tuple[int, bool, float | None], ...] = ()
    sharded: bool = attrs.field(default=attrs.Factory(lambda plan: plan.hardware.gpus > 1, takes_self=True))  # FSDP2

    @property
    def gpus(self) -> int:
        return self.hardware.gpus

    @property
    def replicas(self) -> int:
        return self.gpus // self.shard_size

    @property
    def local(self) -> int:
        """Parameters this device shards (fp32 copies, gradients and moments of these)."""
        return -(-self.units.total // self.shard_size)

    @property
    def parameters(self) -> int:
        return 4 * self.local

    @property
    def gradients(self) -> int:
        return 4 * self.local

    @property
    def optimizer(self) -> int:
        return 8 * self.local

    @property
    def buffers(self) -> int:
        """FSDP2's gathered parameters, unsharded gradients and reduction buffers; one process: the
        autocast weight copies autograd saves."""
        if not self.sharded:
            return self.activations.fixed_checkpointed if self.checkpointing else self.activations.fixed
        u = self.units
        gathered = self.param_bytes * (u.held + u.in_flight)
        gradients = self.param_bytes * u.reducing + self.reduce_bytes * u.largest
        partial = self.reduce_bytes * self.local if self.replicas > 1 and self.accumulation > 1 else 0
        return gathered + gradients + partial

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.buffers

    @property
    def activation_bytes(self) -> int:
        return self.micro_batch * self.activations.per_row(self.checkpointing)

    @property
    def extra_bytes(self) -> int:
        return sum(e.fixed + self.micro_batch * e.per_row for e in self.extra)

    @property
    def total(self) -> int:
        return self.static + self.activation_bytes + self.extra_bytes

    # communication, bytes per device per step
    def _share(self, n: int) -> float:
        return (n - 1) / n

    @property
    def gathered(self) -> float:
        """All-gathers: every unit for each micro-batch's forward, the resharded ones again for its backward."""
        return self.accumulation * self.param_bytes * (2 * self.units.total - self.units.held) * self._share(self.shard_size)

    @property
    def reduce_scattered(self) -> float:
        return self.accumulation * self.reduce_bytes * self.units.total * self._share(self.shard_size)

    @property
    def all_reduced(self) -> float:
        """Across replicas (HSDP), once per step: a ring all-reduce of the local shard."""
        return 2 * self.reduce_bytes * self.local * self._share(self.replicas)

    @property
    def communication(self) -> float:
        return self.gathered + self.reduce_scattered + self.all_reduced

    def groups(self) -> tuple[list[range], list[range]]:
        """(shard groups, replica groups) of ranks, as the 2-D device mesh ("replicate", "shard") lays them."""
        n, s = self.gpus, self.shard_size
        return [range(k * s, (k + 1) * s) for k in range(n // s)], [range(j, n, s) for j in range(s)]

    def timing(self) -> Timing | None:
        """The step's time (see the module's docstring); None without a peak to estimate compute from."""
        hw = self.hardware
        if hw.peak_flops is None:
            return None
        forward = self.micro_batch * self.flops_per_sequence / 3 / (hw.peak_flops * KERNEL_EFFICIENCY)
        backward = 2 * forward + (forward if self.checkpointing else 0.0)
        shard_groups, replica_groups = self.groups()
        shard_link, shard_bw = hw.link(shard_groups)
        replica_link, replica_bw = hw.link(replica_groups)
        optimizer = 0.0 if hw.memory_bandwidth is None else self.local * OPTIMIZER_BYTES_PER_PARAMETER / hw.memory_bandwidth
        compute = self.accumulation * (forward + backward)
        if self.gpus == 1:  # no collective moves data
            return Timing(compute, 0.0, optimizer, shard_link, shard_bw, replica_link, replica_bw)
        u, share, rshare = self.units, self._share(self.shard_size), self._share(self.replicas)
        pb, rb = self.param_bytes, self.reduce_bytes
        # not hidden: the gathers before the first block computes, the root's reductions after the last
        first = pb * (u.held + u.largest) * share / shard_bw
        root = rb * u.root * share / shard_bw
        root_local = -(-u.root // self.shard_size)
        root_all_reduce = 2 * rb * root_local * rshare / replica_bw
        # the rest, beside the compute
        gather_forward = pb * max(u.total - u.held - u.largest, 0) * share / shard_bw
        gather_backward = pb * (u.total - u.held) * share / shard_bw
        reduce_scatter = rb * (u.total - u.root) * share / shard_bw
        all_reduce = 2 * rb * (self.local - root_local) * rshare / replica_bw
        elapsed = 0.0
        for last in [False] * (self.accumulation - 1) + [True]:
            if last and shard_link == replica_link:  # one link carries both
                busy = [gather_backward + reduce_scatter + all_reduce]
            else:
                busy = [gather_backward + reduce_scatter] + ([all_reduce] if last else [])
            elapsed += first + max(forward, gather_forward) + max(backward, *busy) + root
            elapsed += root_all_reduce if last else 0.0
        return Timing(compute, elapsed - compute, optimizer, shard_link, shard_bw, replica_link, replica_bw)

    @property
    def step_time(self) -> float | None:
        timing = self.timing()
        return None if timing is None else timing.total

    @property
    def mfu(self) -> float | None:
        """Model FLOPs (recomputation not counted) over the peak, at the estimated step time."""
        time = self.step_time
        if time is None:
            return None
        model_flops = self.micro_batch * self.accumulation * self.flops_per_sequence
        return model_flops / (time * self.hardware.peak_flops)

    def rank_key(self) -> tuple:
        """Smaller is better: the fastest; without a time estimate, no recomputation and the largest
        micro-batch first, then the least communication; ties to the largest shard (least memory)."""
        time = self.step_time
        if time is None:
            return (self.checkpointing, -self.micro_batch, self.communication, -self.shard_size)
        return (round(time, 9), self.checkpointing, -self.micro_batch, -self.shard_size)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def shard_sizes(gpus: int, shard_size: int | str) -> list[int]:
    """The shard sizes to try: every divisor of ``gpus`` ("auto"), all of them (0) or the one given;
    ValueError for one that does not divide ``gpus``."""
    if shard_size == "auto":
        return divisors(gpus)
    if shard_size and gpus % shard_size:
        raise ValueError(
            f"training.shard_size = {shard_size} is invalid: it must divide the {gpus} processes "
            f"(0: shard over all of them; \"auto\": the fastest that fits)"
        )
    return [shard_size or gpus]


def choose_plan(
    hardware: Hardware,
    units: UnitSizes,
    activations: ActivationProfile,
    global_batch: int,
    seq_len: int,
    flops_per_sequence: float,
    micro_batch: int | str = "auto",
    checkpointing: bool | str = "auto",
    shard_size: int | str = 0,
    param_bytes: int = 2,
    reduce_bytes: int = 4,
    extra: tuple[ExtraBuffer, ...] = (),
    sharded: bool | None = None,
) -> Plan:
    """The plan ``train`` runs: among the shard sizes, checkpointing settings and micro-batches (dividing
    the process's rows) left "auto", the best that fits by :meth:`Plan.rank_key`; PlanError if none does.
    ``sharded``: FSDP2 applied (default: on more than one GPU)."""
    sharded = hardware.gpus > 1 if sharded is None else sharded
    local = split_batch(global_batch, hardware.gpus).local_rows
    options = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
    sizes = divisors(local) if micro_batch == "auto" else [micro_batch or local]
    shards = shard_sizes(hardware.gpus, shard_size)
    best: dict[int, Plan] = {}
    for shard in shards:
        for ckpt in options:
            for micro in sizes:
                plan = Plan(hardware, units, activations, global_batch, seq_len, flops_per_sequence, ckpt, micro,
                            local // micro, shard, param_bytes, reduce_bytes, extra, sharded=sharded)
                if plan.total <= hardware.usable and (shard not in best or plan.rank_key() < best[shard].rank_key()):
                    best[shard] = plan
    if not best:
        fixes = [f"training.activation_checkpointing = {v}" for v in ("true",) if checkpointing is False]
        fixes += ['training.micro_batch_size = "auto"'] if micro_batch != "auto" else []
        fixes += ['training.shard_size = 0 (shard over all GPUs)'] if max(shards) < hardware.gpus else []
        worst = Plan(hardware, units, activations, global_batch, seq_len, flops_per_sequence, True, min(sizes),
                     local // min(sizes), max(shards), param_bytes, reduce_bytes, extra, sharded=sharded)
        raise PlanError(refusal(worst, fixes))
    chosen = min(best.values(), key=Plan.rank_key)
    if len(shards) == 1:
        return chosen
    considered = tuple((s, s in best, best[s].step_time if s in best else None) for s in shards)
    return attrs.evolve(chosen, considered=considered)


def refusal(worst: Plan, fixes: list[str]) -> str:
    """Why nothing fits, in numbers (``worst``: the most frugal configuration tried), and what would:
    more GPUs (the fewest that fit one sequence per forward with checkpointing), the ``fixes`` of
    settings, a smaller model."""
    hw, a, micro = worst.hardware, worst.activations, worst.micro_batch
    lines = [
        f"{worst.global_batch // hw.gpus} sequences per GPU ({worst.global_batch} over {hw.gpus}) do not fit in "
        f"{gib(hw.usable)} GiB usable of {gib(hw.memory)} GiB: parameters {gib(worst.parameters)} + "
        f"gradients {gib(worst.gradients)} + optimizer {gib(worst.optimizer)} + buffers {gib(worst.buffers)} "
        f"= {gib(worst.static)} GiB before activations; {micro} sequence(s) per forward save "
        f"{gib(micro * a.per_row(False))} GiB without checkpointing, {gib(micro * a.per_row(True))} GiB with it",
    ]
    needed = next(
        (n for n in (2**k for k in range(16)) if n >= hw.gpus and worst.global_batch % n == 0
         and attrs.evolve(worst, hardware=attrs.evolve(hw, gpus=n), micro_batch=1, accumulation=worst.global_batch // n,
                          shard_size=n, sharded=worst.sharded or n > 1).total <= hw.usable),
        None,
    )
    more = [f"at least {needed} GPUs"] if needed is not None and needed > hw.gpus else []
    fixes = more + fixes + ["a shorter model.seq_len or a smaller model"]
    return "; ".join(lines) + ". Change: " + ", or ".join(fixes) + "."


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def layout_words(plan: Plan) -> str:
    """How the parameters are spread: one process, FSDP2 over all, or HSDP replicas x shards."""
    if not plan.sharded:
        return "one process"
    if plan.replicas == 1:
        return f"FSDP2 over {plan.gpus}"
    return f"HSDP: {plan.replicas} replicas x {plan.shard_size} shards"


def describe(plan: Plan, name: str = "recipe") -> str:
    """The plan as the lines ``unetlm plan`` and ``train`` print."""
    hw, a = plan.hardware, plan.activations
    dtype = {2: "bf16", 4: "fp32"}
    share = f"1/{plan.shard_size}" if plan.shard_size > 1 else "whole"
    lines = [
        f"{name} on {hw.gpus} x {gib(hw.memory)} GiB {hw.name} ({layout_words(plan)}); "
        f"{plan.units.total:,} parameters",
        f"global batch {plan.global_batch} x {plan.seq_len} = {plan.global_batch // hw.gpus} sequences per "
        f"{hw.name}: micro-batch {plan.micro_batch} x {plan.accumulation} accumulated, activation checkpointing "
        f"{'on' if plan.checkpointing else 'off'}",
        "per-device memory (GiB):",
        f"  parameters (fp32, {share})".ljust(36) + f"{gib(plan.parameters):>9}",
        f"  gradients (fp32, {share})".ljust(36) + f"{gib(plan.gradients):>9}",
        f"  optimizer state (AdamW, {share})".ljust(36) + f"{gib(plan.optimizer):>9}",
        f"  {'FSDP2 buffers' if plan.sharded else 'batch-independent saved':<34}{gib(plan.buffers):>9}",
        f"  activations per sequence          {gib(a.per_row(False)):>9} without checkpointing, "
        f"{gib(a.per_row(True))} with",
        f"  activations of the micro-batch    {gib(plan.activation_bytes):>9}",
    ]
    lines += [f"  {e.name:<34}{gib(e.fixed + plan.micro_batch * e.per_row):>9}" for e in plan.extra]
    lines.append(
        f"  total                             {gib(plan.total):>9} of {gib(hw.usable)} usable "
        f"({USABLE_FRACTION:.0%} of {gib(hw.memory)})"
    )
    timing = plan.timing()
    if hw.gpus > 1:
        shard_groups, replica_groups = plan.groups()
        shard_link, _ = hw.link(shard_groups)
        text = (
            f"communication per step per {hw.name}: {dtype[plan.param_bytes]} all-gathers {plan.gathered / 1e9:.3g} GB "
            f"and {dtype[plan.reduce_bytes]} reduce-scatters {plan.reduce_scattered / 1e9:.3g} GB within "
            f"{plan.shard_size} rank{'s' if plan.shard_size > 1 else ''} over {shard_link}"
        )
        if plan.replicas > 1:
            text += (f", {dtype[plan.reduce_bytes]} all-reduce {plan.all_reduced / 1e9:.3g} GB across "
                     f"{plan.replicas} replicas over {hw.link(replica_groups)[0]}")
        lines.append(text)
    if timing is not None:
        links = "" if hw.gpus == 1 else (
            f"; links at {timing.shard_bandwidth / 1e9:.0f} GB/s ({timing.shard_link})"
            + (f" and {timing.replica_bandwidth / 1e9:.0f} GB/s ({timing.replica_link})"
               if plan.replicas > 1 and timing.replica_link != timing.shard_link else "")
        )
        lines.append(
            f"estimated step: {timing.total:.3g} s = compute {timing.compute:.3g} s (at {KERNEL_EFFICIENCY:.0%} of "
            f"{hw.peak_flops / 1e12:.0f} TFLOP/s) + communication not hidden {timing.exposed:.3g} s + optimizer "
            f"{timing.optimizer:.3g} s; MFU {plan.mfu:.1%}{links}"
        )
    if plan.considered:
        options = ", ".join(
            f"{s}: {'does not fit' if not fits else 'fits' if t is None else f'{t:.3g} s'}" for s, fits, t in plan.considered
        )
        lines.append(f"shard_size \"auto\" chose {plan.shard_size}; per shard size: {options}")
    return "\n".join(lines)
