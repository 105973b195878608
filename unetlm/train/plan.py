"""Memory and throughput planner: what one GPU holds, and what a step costs, before weights exist.

Activations are measured, not modelled: the recipe's model is built under ``FakeTensorMode``
(shapes and dtypes only, no storage), one forward runs under bfloat16 autocast (or in float32,
as the run will) with
``saved_tensors_hooks`` adding up the distinct storages autograd keeps for backward
(parameters excluded), at 1 and 2 sequences per forward, with and without activation
checkpointing: the difference is the cost per sequence. The forward takes the CPU code path
(SDPA; FlexAttention serves CUDA and saves no more than that, so on a GPU the figure is an
upper bound for sliding-window attention).

Per GPU, with FSDP2 over ``gpus`` processes and AdamW: fp32 parameters, gradients and two
moments sharded ``1/gpus``; the bf16 all-gather buffers of the units in flight (the root unit
plus two blocks, the next one prefetched) and the unsharded fp32 gradients of the largest unit
before its reduce-scatter; activations of one micro-batch. Without FSDP (one process) the
autocast copies of the weights saved for backward count instead of the buffers.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import contextmanager

import attrs
import torch

GIB = 2**30
USABLE_FRACTION = 0.85  # of device memory: the rest for the CUDA context, NCCL, allocator slack, temporaries
KERNEL_EFFICIENCY = 0.5  # achieved fraction of the bf16 peak in the estimate of the compute time
INTRA_NODE_BYTES_S = 300e9  # NVLink collectives, per GPU (up to 8 GPUs: one node)
INTER_NODE_BYTES_S = 40e9  # InfiniBand collectives, per GPU (more than 8 GPUs)
GPUS_PER_NODE = 8


class PlanError(ValueError):
    """The configuration cannot fit; the message holds the numbers and what to change."""


class MeasurementError(PlanError):
    """The model's forward does not run on fake tensors, so its activations cannot be measured."""


def _storage_key(t: torch.Tensor):
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage())


@attrs.define
class SavedBytes:
    """Bytes autograd keeps for backward: in total and by the module (a mixer stack) that saved them."""

    total: int = 0
    by_stack: dict = attrs.field(factory=dict)


def count_saved_bytes(model: torch.nn.Module, run: Callable[[], object]) -> SavedBytes:
    """Run ``run()`` (a forward of ``model``) and count the distinct storages saved for backward,
    leaving out the model's parameters; real and fake tensors alike."""
    from unetlm.model.stack import Stack

    params = {_storage_key(p) for p in model.parameters()}
    seen: set = set()
    out = SavedBytes()
    current: list[str] = []

    def enter(name: str):
        return lambda module, args: current.append(name)

    def leave(module, args, output) -> None:
        current.pop()

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, Stack):
            hooks += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in params and key not in seen:
            seen.add(key)
            size = t.untyped_storage().nbytes()
            out.total += size
            if current:
                out.by_stack[current[-1]] = out.by_stack.get(current[-1], 0) + size
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    return out


def example_inputs(model, rows: int, seq_len: int) -> tuple:
    """(tokens, doc, masks, targets) of ``rows`` sequences: shapes are all the planner needs."""
    tokens = torch.randint(0, 256, (rows, seq_len))
    doc = torch.zeros(rows, seq_len, dtype=torch.long)
    masks = [torch.zeros(rows, seq_len, dtype=torch.bool) for _ in model.splitters]
    return tokens, doc, masks, tokens.clone()


def saved_by_forward(model, inputs: tuple, checkpointing: bool, autocast: bool = True) -> SavedBytes:
    """Saved bytes of one training forward of ``inputs`` (the CPU's code path), under bfloat16
    autocast or in float32."""
    from unetlm.model.stack import Stack

    stacks = [m for m in model.modules() if isinstance(m, Stack)]
    before = [s.checkpointing for s in stacks]
    for s in stacks:
        s.checkpointing = checkpointing
    model.train()

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(*inputs)

    try:
        return count_saved_bytes(model, run)
    finally:
        for s, b in zip(stacks, before):
            s.checkpointing = b


@attrs.frozen
class ActivationProfile:
    """Saved bytes of a forward: ``fixed + rows * per_sequence``, without and with checkpointing."""

    per_sequence: int
    fixed: int  # independent of the rows: mostly the autocast bf16 copies of the weights
    per_sequence_checkpointed: int  # the checkpointed blocks' inputs and what lies outside blocks
    fixed_checkpointed: int
    block_peak: int  # per sequence: the largest block's saved bytes, live again while it is recomputed

    def saved(self, rows: int, checkpointing: bool) -> int:
        """Bytes saved for backward by a forward of ``rows`` sequences."""
        if checkpointing:
            return self.fixed_checkpointed + rows * self.per_sequence_checkpointed
        return self.fixed + rows * self.per_sequence

    def per_row(self, checkpointing: bool) -> int:
        """Peak activation bytes per sequence (with checkpointing: plus one block recomputed)."""
        return self.per_sequence_checkpointed + self.block_peak if checkpointing else self.per_sequence


@contextmanager
def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        yield


_PROFILES: dict[str, ActivationProfile] = {}


def measure_activations(model_spec, autocast: bool = True) -> ActivationProfile:
    """The profile of ``model_spec`` (a ModelSpec) under bfloat16 autocast (or float32), measured on a
    fake model: nothing is allocated. Remembered per process by the spec's content."""
    import json

    from unetlm.recipe.structure import unstructure

    key = json.dumps([unstructure(model_spec), autocast], sort_keys=True, default=str)
    if key not in _PROFILES:
        try:
            _PROFILES[key] = _measure(model_spec, autocast)
        except Exception as exc:  # noqa: BLE001 - e.g. a plugin component that reads tensor values
            raise MeasurementError(
                f"the planner could not run the model on fake tensors ({type(exc).__name__}: {exc}); set "
                f"training.micro_batch_size and training.activation_checkpointing explicitly"
            ) from exc
    return _PROFILES[key]


def _measure(model_spec, autocast: bool) -> ActivationProfile:
    import warnings

    from unetlm.api import build_model

    with _fake_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast's dtype notices, once per op kind: not the user's concern
        model = build_model(model_spec)
        runs = {}
        for ckpt in (False, True):
            for rows in (1, 2):
                inputs = example_inputs(model, rows, model_spec.seq_len)
                runs[ckpt, rows] = saved_by_forward(model, inputs, ckpt, autocast)
    from unetlm.model.stack import Stack

    blocks = {name: len(m.blocks) for name, m in model.named_modules() if isinstance(m, Stack)}
    one, two = runs[False, 1], runs[False, 2]
    block_peak = max(
        ((two.by_stack.get(n, 0) - one.by_stack.get(n, 0)) // k for n, k in blocks.items() if k), default=0
    )
    per = two.total - one.total
    per_ck = runs[True, 2].total - runs[True, 1].total
    return ActivationProfile(per, one.total - per, per_ck, runs[True, 1].total - per_ck, block_peak)


@attrs.frozen
class ParameterLayout:
    """Parameter counts as FSDP2 units see them: the whole model, its largest block, the root."""

    total: int
    largest_block: int
    root: int  # everything outside the mixer blocks (embeddings, poolers, upsamplers, head)


def parameter_layout(model) -> ParameterLayout:
    from unetlm.model.stack import Stack
    from unetlm.model.summary import count_params

    blocks = [b for m in model.modules() if isinstance(m, Stack) for b in m.blocks]
    total = count_params(model)
    in_blocks = count_params(*blocks) if blocks else 0
    return ParameterLayout(total, max((count_params(b) for b in blocks), default=0), total - in_blocks)


@attrs.frozen
class Hardware:
    gpus: int
    memory: int  # bytes per device
    peak_flops: float | None  # bf16 dense FLOP/s per device (None: no time estimate)
    name: str = "GPU"

    @property
    def usable(self) -> int:
        return int(self.memory * USABLE_FRACTION)

    @property
    def bandwidth(self) -> float:
        return INTRA_NODE_BYTES_S if self.gpus <= GPUS_PER_NODE else INTER_NODE_BYTES_S


@attrs.frozen
class Plan:
    """What one device holds and does per optimizer step; bytes unless said otherwise."""

    hardware: Hardware
    params: ParameterLayout
    activations: ActivationProfile
    global_batch: int
    seq_len: int
    flops_per_sequence: float  # training FLOPs (forward + backward) of one sequence
    checkpointing: bool
    micro_batch: int
    accumulation: int

    @property
    def parameters(self) -> int:
        return 4 * self.params.total // self.hardware.gpus

    @property
    def gradients(self) -> int:
        return 4 * self.params.total // self.hardware.gpus

    @property
    def optimizer(self) -> int:
        return 8 * self.params.total // self.hardware.gpus

    @property
    def buffers(self) -> int:
        """FSDP2's gathered bf16 units and unsharded fp32 gradients; one process: the autocast weight copies."""
        if self.hardware.gpus == 1:
            return self.activations.fixed_checkpointed if self.checkpointing else self.activations.fixed
        p = self.params
        return 2 * (p.root + 2 * p.largest_block) + 4 * max(p.root, p.largest_block)

    @property
    def static(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.buffers

    @property
    def activation_bytes(self) -> int:
        return self.micro_batch * self.activations.per_row(self.checkpointing)

    @property
    def total(self) -> int:
        return self.static + self.activation_bytes

    @property
    def communication(self) -> int:
        """Bytes per step per GPU: bf16 all-gathers of the parameters in every micro-batch's forward and
        backward, one fp32 reduce-scatter of the gradients."""
        n = self.hardware.gpus
        if n == 1:
            return 0
        share = (n - 1) / n
        return int(self.params.total * share * (2 * 2 * self.accumulation + 4))

    @property
    def compute_flops(self) -> float:
        """FLOPs one GPU runs per step, the recomputed forward of checkpointing included."""
        rows = self.micro_batch * self.accumulation
        return rows * self.flops_per_sequence * (4 / 3 if self.checkpointing else 1.0)

    @property
    def step_time(self) -> float | None:
        """Seconds: compute at ``KERNEL_EFFICIENCY`` of the peak, overlapped with communication."""
        if self.hardware.peak_flops is None:
            return None
        compute = self.compute_flops / (self.hardware.peak_flops * KERNEL_EFFICIENCY)
        return max(compute, self.communication / self.hardware.bandwidth)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs (recomputation not counted) over the peak, at the estimated step time."""
        time = self.step_time
        if time is None:
            return None
        model_flops = self.micro_batch * self.accumulation * self.flops_per_sequence
        return model_flops / (time * self.hardware.peak_flops)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_plan(
    hardware: Hardware,
    params: ParameterLayout,
    activations: ActivationProfile,
    global_batch: int,
    seq_len: int,
    flops_per_sequence: float,
    micro_batch: int | str = "auto",
    checkpointing: bool | str = "auto",
) -> Plan:
    """The plan ``train`` runs: checkpointing off unless not even one sequence fits without it ("auto"),
    then the largest micro-batch dividing the process's rows that fits ("auto"); PlanError if none does."""
    from unetlm.train.scaling import split_batch

    local = split_batch(global_batch, hardware.gpus).local_rows
    options = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
    sizes = divisors(local) if micro_batch == "auto" else [micro_batch or local]
    for ckpt in options:
        for micro in sorted(sizes, reverse=True):
            plan = Plan(
                hardware, params, activations, global_batch, seq_len, flops_per_sequence, ckpt, micro, local // micro
            )
            if plan.total <= hardware.usable:
                return plan
    raise PlanError(refusal(hardware, params, activations, global_batch, seq_len, flops_per_sequence, min(sizes)))


def refusal(hardware, params, activations, global_batch, seq_len, flops, micro) -> str:
    worst = Plan(hardware, params, activations, global_batch, seq_len, flops, True, micro, 1)
    lines = [
        f"{global_batch // hardware.gpus} sequences per GPU ({global_batch} over {hardware.gpus}) do not fit in "
        f"{gib(hardware.usable)} GiB usable of {gib(hardware.memory)} GiB: parameters {gib(worst.parameters)} + "
        f"gradients {gib(worst.gradients)} + optimizer {gib(worst.optimizer)} + buffers {gib(worst.buffers)} "
        f"= {gib(worst.static)} GiB before activations; {micro} sequence(s) per forward save "
        f"{gib(micro * activations.per_row(False))} GiB without checkpointing, "
        f"{gib(micro * activations.per_row(True))} GiB with it",
    ]
    needed = next(
        (n for n in (2**k for k in range(16)) if n >= hardware.gpus and global_batch % n == 0
         and Plan(attrs.evolve(hardware, gpus=n), params, activations, global_batch, seq_len, flops, True, 1,
                  global_batch // n).total <= hardware.usable),
        None,
    )
    fixes = ["training.activation_checkpointing = true (or \"auto\")", "training.micro_batch_size = \"auto\""]
    if needed is not None and needed > hardware.gpus:
        fixes.insert(0, f"at least {needed} GPUs")
    fixes.append("a shorter model.seq_len or a smaller model")
    return "; ".join(lines) + ". Change: " + ", or ".join(fixes) + "."


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def parse_memory(text: str) -> int:
    """``"80GiB"``, ``"80GB"``, ``"141 GB"`` or ``"80"`` (GiB) -> bytes."""
    units = {"gib": GIB, "gb": 10**9, "tib": 2**40, "tb": 10**12, "mib": 2**20, "mb": 10**6, "": GIB}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("abgimt")
    unit = t[len(number):]
    if unit not in units or not number:
        raise ValueError(f"--gpu-memory {text!r} is invalid: expected a size such as 80GiB or 141GB")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r} is invalid: expected a size such as 80GiB or 141GB") from None
    if value <= 0:
        raise ValueError(f"--gpu-memory {text!r} is invalid: expected a positive size")
    return int(value * units[unit])


def plan_recipe(recipe, hardware: Hardware, flops_per_byte: float | None = None) -> Plan:
    """The plan of ``recipe`` on ``hardware``, from a meta-device model (no weights are built);
    "auto" batch and lr resolve from the compute budget as training does."""
    from unetlm.api import build_model
    from unetlm.model.summary import summarize
    from unetlm.train.scaling import resolve_budget

    spec = recipe.training
    with torch.device("meta"):
        model = build_model(recipe)
    summary = summarize(model)
    seq_len = recipe.model.seq_len
    bytes_per_token = summary.bytes_per_token
    if flops_per_byte is None:
        if bytes_per_token is None:
            if spec.batch_size == "auto":
                raise PlanError(
                    "a tokenized model's auto batch needs its bytes per token, known once the tokenizer is "
                    "trained; set training.batch_size to plan it"
                )
            bytes_per_token = 1.0  # only the batch needs it, and the batch is fixed
        flops_per_byte = summary.train_flops_per_token / bytes_per_token
    budget = resolve_budget(spec.batch_size, spec.lr, spec.steps, seq_len, flops_per_byte, bytes_per_token or 1.0)
    return plan_model(recipe, model, budget, hardware, autocast=spec.dtype != "float32")


def plan_model(recipe, meta_model, budget, hardware: Hardware, autocast: bool) -> Plan:
    """The plan of ``recipe`` (its ``meta_model``, any device) for the resolved ``budget``, its
    activations measured under bfloat16 autocast or in float32."""
    spec, seq_len = recipe.training, recipe.model.seq_len
    activations = measure_activations(recipe.model, autocast)
    return choose_plan(
        hardware, parameter_layout(meta_model), activations, budget.batch_size, seq_len,
        budget.flops_per_byte * seq_len * budget.bytes_per_token, spec.micro_batch_size, spec.activation_checkpointing,
    )


def describe(plan: Plan, name: str = "recipe") -> str:
    """The plan as the lines ``unetlm plan`` and ``train`` print."""
    hw, a = plan.hardware, plan.activations
    fsdp = f"FSDP2 over {hw.gpus}" if hw.gpus > 1 else "one process"
    lines = [
        f"{name} on {hw.gpus} x {gib(hw.memory)} GiB {hw.name} ({fsdp}); {plan.params.total:,} parameters",
        f"global batch {plan.global_batch} x {plan.seq_len} = {plan.global_batch // hw.gpus} sequences per "
        f"{hw.name}: micro-batch {plan.micro_batch} x {plan.accumulation} accumulated, activation checkpointing "
        f"{'on' if plan.checkpointing else 'off'}",
        "per-device memory (GiB):",
        f"  parameters (fp32, sharded)        {gib(plan.parameters):>9}",
        f"  gradients (fp32, sharded)         {gib(plan.gradients):>9}",
        f"  optimizer state (AdamW, sharded)  {gib(plan.optimizer):>9}",
        f"  {'FSDP2 buffers' if hw.gpus > 1 else 'batch-independent saved':<32}  {gib(plan.buffers):>9}",
        f"  activations per sequence          {gib(a.per_row(False)):>9} without checkpointing, "
        f"{gib(a.per_row(True))} with",
        f"  activations of the micro-batch    {gib(plan.activation_bytes):>9}",
        f"  total                             {gib(plan.total):>9} of {gib(hw.usable)} usable "
        f"({USABLE_FRACTION:.0%} of {gib(hw.memory)})",
    ]
    if hw.gpus > 1:
        lines.append(
            f"communication per step: {plan.communication / 1e9:.2f} GB per {hw.name} (bf16 all-gather of the "
            f"parameters per micro-batch forward and backward, fp32 reduce-scatter of the gradients)"
        )
    if plan.step_time is not None:
        lines.append(
            f"estimated step: {plan.step_time:.2f} s, MFU {plan.mfu:.1%} (compute at {KERNEL_EFFICIENCY:.0%} of "
            f"{hw.peak_flops / 1e12:.0f} TFLOP/s, communication at {hw.bandwidth / 1e9:.0f} GB/s overlapped)"
        )
    return "\n".join(lines)


def host_hardware(local_processes: int) -> Hardware:
    """This host's memory available to one of ``local_processes`` processes (training on CPUs)."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(1, available // max(local_processes, 1), None, "CPU process")


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


def cuda_hardware(device: torch.device, gpus: int) -> Hardware:
    props = torch.cuda.get_device_properties(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in props.name), None)
    return Hardware(gpus, props.total_memory, peak, props.name)


def hardware_for(device: torch.device, processes: int) -> Hardware:
    if device.type == "cuda":
        return cuda_hardware(device, processes)
    hw = host_hardware(int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
    return attrs.evolve(hw, gpus=processes)


def plan_training(recipe, budget, device: torch.device, processes: int, stored_batch: int | None = None):
    """(training spec with micro_batch_size and activation_checkpointing resolved, plan or None).

    Checks the global batch against the process count and a resumed run's stored batch; plans
    (and refuses what cannot fit) on CUDA always, on CPUs only where a value is "auto" (against
    the host memory available to each local process)."""
    from unetlm.train.scaling import check_resumed_batch, split_batch

    spec = recipe.training
    check_resumed_batch(stored_batch, budget.batch_size)
    fixed_micro = 0 if spec.micro_batch_size == "auto" else spec.micro_batch_size
    split_batch(budget.batch_size, processes, fixed_micro)
    auto = "auto" in (spec.micro_batch_size, spec.activation_checkpointing)
    if not auto and device.type != "cuda":
        return spec, None
    from unetlm.api import build_model

    with torch.device("meta"):
        model = build_model(recipe)
    try:
        from unetlm.train.loop import autocast_dtype  # the dtype training will run in

        autocast = autocast_dtype(spec, device) is not None
        plan = plan_model(recipe, model, budget, hardware_for(device, processes), autocast)
    except MeasurementError as exc:
        if auto:
            raise
        print(f"note: no memory plan: {exc}", flush=True)
        return spec, None
    return attrs.evolve(spec, micro_batch_size=plan.micro_batch, activation_checkpointing=plan.checkpointing), plan


def plan_run(recipe, budget, world, state: dict | None, show: bool = True):
    """``train``'s call: the training spec to run with (``plan_training``) for this ``world`` and resumed
    ``state``; the chosen plan printed on the main process; TrainingError for what cannot run."""
    from unetlm.train.errors import TrainingError

    stored = (state or {}).get("data", {}).get("batch_size")
    try:
        spec, plan = plan_training(recipe, budget, world.device, world.size, stored)
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    if plan is not None and show and world.main:
        print(describe(plan, recipe.name or "recipe"), flush=True)
    return spec
