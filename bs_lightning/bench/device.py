"""The device label of result files: what a benchmark or result writer names its hardware by.

- `device_label(device)`: the GPU's name on CUDA (`NVIDIA H200`), the CPU's model name
  otherwise (`/proc/cpuinfo` "model name", e.g. `AMD EPYC 9R14 Processor`); the kernel
  benchmark's `machine` field.
- `machine_description(device)`: the label with the CPU's core count, and whether a GPU is
  visible (`2-core AMD EPYC 9R14 Processor, no GPU`), for one-line result headers.
- `device_slug(device)`: the label as a file-name stem (`cpu-2core`, `nvidia-h200`).
- `load_average()`: the 1-minute load average result files record beside their times.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

__all__ = ["cpu_model_name", "device_label", "device_slug", "load_average", "machine_description"]


def cpu_model_name() -> str:
    """The CPU's "model name" from /proc/cpuinfo, else what `platform` knows (e.g. `x86_64`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device | str) -> str:
    """`torch.cuda.get_device_name` on CUDA, the CPU's model name otherwise."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model_name()


def machine_description(device: torch.device | str = "cpu") -> str:
    """`2-core <CPU model>, no GPU` (", no GPU" only when CUDA is unavailable) on the CPU,
    `<GPU name> (<N>-core <CPU model> host)` on CUDA."""
    device = torch.device(device)
    cpu = f"{os.cpu_count()}-core {cpu_model_name()}"
    if device.type == "cuda":
        return f"{device_label(device)} ({cpu} host)"
    return cpu if torch.cuda.is_available() else f"{cpu}, no GPU"


def device_slug(device: torch.device | str) -> str:
    """`cpu-2core` (intra-op threads) on the CPU, `nvidia-h200` for an NVIDIA H200."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"cpu-{torch.get_num_threads()}core"
    name = device_label(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def load_average() -> float | None:
    """The 1-minute load average (runnable processes), or None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
