"""The devices a plan is made for: memory, bf16 peak and collective bandwidth per device."""
from __future__ import annotations

import os

import attrs
import torch

GIB = 2**30
USABLE_FRACTION = 0.85  # of device memory: the rest for the CUDA context, NCCL, allocator slack, temporaries
INTRA_NODE_BYTES_S = 300e9  # NVLink collectives, per GPU (up to 8 GPUs: one node)
INTER_NODE_BYTES_S = 40e9  # InfiniBand collectives, per GPU (more than 8 GPUs)
GPUS_PER_NODE = 8
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12}


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


def cuda_hardware(device: torch.device, gpus: int) -> Hardware:
    props = torch.cuda.get_device_properties(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in props.name), None)
    return Hardware(gpus, props.total_memory, peak, props.name)


def hardware_for(device: torch.device, processes: int) -> Hardware:
    if device.type == "cuda":
        return cuda_hardware(device, processes)
    hw = host_hardware(int(os.environ.get("LOCAL_WORLD_SIZE", processes)))
    return attrs.evolve(hw, gpus=processes)


def parse_memory(text: str) -> int:
    """``"80GiB"``, ``"80GB"``, ``"141 GB"`` or ``"80"`` (GiB) -> bytes; at least 1 GiB (a GPU's memory)."""
    units = {"gib": GIB, "gb": 10**9, "tib": 2**40, "tb": 10**12, "mib": 2**20, "mb": 10**6, "kib": 2**10,
             "kb": 10**3, "b": 1, "": GIB}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("abgikmt")
    unit = t[len(number):]
    if unit not in units or not number:
        raise ValueError(f"--gpu-memory {text!r} is invalid: expected a size such as 80GiB or 141GB")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r} is invalid: expected a size such as 80GiB or 141GB") from None
    if not GIB <= value * units[unit] < 2**60:  # NaN and inf included
        raise ValueError(f"--gpu-memory {text!r} is invalid: expected a GPU's memory, at least 1GiB (e.g. 80GiB)")
    return int(value * units[unit])
