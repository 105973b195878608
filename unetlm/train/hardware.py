"""The devices a plan is made for: memory, bf16 peak, memory bandwidth, and the links between them.

Rates are nominal (what a data sheet gives); the planner applies the achieved fractions
(``KERNEL_EFFICIENCY`` in :mod:`unetlm.train.plan`, ``COLLECTIVE_EFFICIENCY`` here). Ranks fill a
node before the next: ranks ``k * gpus_per_node ...`` share a node and its NVLink, and
everything between nodes goes over InfiniBand, one NIC per GPU.
"""
from __future__ import annotations

import math
import os
import re

import attrs
import torch

GIB = 2**30
USABLE_FRACTION = 0.85  # of device memory: the rest for the CUDA context, NCCL, allocator slack, temporaries
COLLECTIVE_EFFICIENCY = 0.8  # achieved fraction of a link's rate in NCCL's ring all-gather / reduce-scatter / all-reduce
NVLINK_BYTES_S = 450e9  # H100 SXM NVLink 4, per GPU and direction (900 GB/s both ways)
INFINIBAND_BYTES_S = 400e9 / 8  # 400 Gb/s NDR, one NIC per GPU
GPUS_PER_NODE = 8
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}
MEMORY_BYTES_S = {"H100": 3.35e12, "H200": 4.8e12, "H800": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}
H100_MEMORY_BYTES_S = MEMORY_BYTES_S["H100"]


@attrs.frozen
class Hardware:
    """``gpus`` devices of ``memory`` bytes each, in nodes of ``gpus_per_node``; rates in bytes or FLOPs
    per second per device (links: per direction). ``peak_flops`` None: no time estimate."""

    gpus: int
    memory: int  # bytes per device
    peak_flops: float | None  # bf16 dense FLOP/s per device
    name: str = "GPU"
    gpus_per_node: int = GPUS_PER_NODE
    intra_node_bandwidth: float = NVLINK_BYTES_S
    inter_node_bandwidth: float = INFINIBAND_BYTES_S
    memory_bandwidth: float | None = H100_MEMORY_BYTES_S  # None: the optimizer step is not timed
    bf16: bool = True  # computes in bfloat16 (what dtype = "auto" asks for)
    links: tuple[str, str] = ("NVLink", "InfiniBand")  # names of the links within and between nodes

    @property
    def usable(self) -> int:
        return int(self.memory * USABLE_FRACTION)

    def spans_nodes(self, groups: list[range]) -> bool:
        """Whether any of the rank ``groups`` (collectives running side by side) reaches beyond one node."""
        return any(len({rank // self.gpus_per_node for rank in group}) > 1 for group in groups)

    def link(self, groups: list[range]) -> tuple[str, float]:
        """(name, achieved bytes/s per GPU) of the link a collective over each of ``groups`` is bound by."""
        if self.spans_nodes(groups):
            return self.links[1], self.inter_node_bandwidth * COLLECTIVE_EFFICIENCY
        return self.links[0], self.intra_node_bandwidth * COLLECTIVE_EFFICIENCY


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
    processes = max(local_processes, 1)
    return Hardware(1, available // processes, None, "CPU process", gpus_per_node=processes, memory_bandwidth=None,
                    bf16=False, links=("the host", "the network"))


def by_name(table: dict[str, float], name: str) -> float | None:
    return next((v for k, v in table.items() if k in name), None)


def cuda_hardware(device: torch.device, gpus: int, gpus_per_node: int = GPUS_PER_NODE) -> Hardware:
    props = torch.cuda.get_device_properties(device)
    return Hardware(
        gpus, props.total_memory, by_name(PEAK_BF16_FLOPS, props.name), props.name, gpus_per_node,
        memory_bandwidth=by_name(MEMORY_BYTES_S, props.name), bf16=torch.cuda.is_bf16_supported(),
    )


def hardware_for(device: torch.device, processes: int) -> Hardware:
    """The hardware of a run of ``processes`` on ``device``s; torchrun's LOCAL_WORLD_SIZE is the node size."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", min(processes, GPUS_PER_NODE)))
    if device.type == "cuda":
        return cuda_hardware(device, processes, local)
    return attrs.evolve(host_hardware(local), gpus=processes)


def parse_memory(text: str, option: str = "--gpu-memory") -> int:
    """``"80GiB"``, ``"80GB"``, ``"141 GB"`` or ``"80"`` (GiB) -> bytes; at least 1 GiB (a GPU's memory).
    ``option``: where the text came from, for the error."""
    units = {"gib": GIB, "gb": 10**9, "tib": 2**40, "tb": 10**12, "mib": 2**20, "mb": 10**6, "kib": 2**10,
             "kb": 10**3, "b": 1, "": GIB}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("abgikmt")
    unit = t[len(number):]
    if unit not in units or not number:
        raise ValueError(f"{option} {text!r} is invalid: expected a size such as 80GiB or 141GB")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{option} {text!r} is invalid: expected a size such as 80GiB or 141GB") from None
    if not GIB <= value * units[unit] < 2**60:  # NaN and inf included
        raise ValueError(f"{option} {text!r} is invalid: expected a GPU's memory, at least 1GiB (e.g. 80GiB)")
    return int(value * units[unit])


_RATE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(?:([kMGT]?)(B|b)(?:/s|ps))?$")


def parse_bandwidth(text: str, option: str) -> float:
    """``"450GB/s"`` (bytes), ``"400Gb/s"`` or ``"400Gbps"`` (bits), ``"3.35TB/s"`` or ``"450"`` (GB/s) -> bytes/s."""
    match = _RATE.match(text.strip())
    value = float(match.group(1)) if match else 0.0
    if not match or value <= 0:
        raise ValueError(
            f"{option} {text!r} is invalid: expected a positive rate such as 450GB/s (bytes) or 400Gb/s (bits)"
        )
    prefix, unit = match.group(2), match.group(3)
    scale = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[prefix or ""] if unit else 1e9
    rate = value * scale / (8 if unit == "b" else 1)
    if not math.isfinite(rate):
        raise ValueError(f"{option} {text!r} is invalid: expected a finite rate such as 450GB/s or 400Gb/s")
    return rate
