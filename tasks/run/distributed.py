"""Data-parallel helpers for ``conf/trainer/ddp.yaml``.

``trainer=ddp`` runs one process per device: every local GPU (NCCL) on a CUDA host, otherwise
``cpu_processes`` CPU processes that talk over gloo (Lightning picks the backend from the device).
"""

from __future__ import annotations

import torch


def ddp_devices(cpu_processes: int = 2, accelerator: str = "auto") -> int:
    """The number of DDP processes for ``trainer.accelerator``: ``cpu`` -> ``cpu_processes`` (also on a
    GPU host); ``gpu``/``cuda`` -> ``-1`` (all GPUs); ``auto`` -> all GPUs when CUDA is available,
    else ``cpu_processes``."""
    if isinstance(cpu_processes, bool) or not isinstance(cpu_processes, int) or cpu_processes < 1:
        raise ValueError(f"invalid trainer.devices.cpu_processes={cpu_processes!r}; allowed: an integer >= 1")
    if accelerator == "cpu":
        return cpu_processes
    if accelerator in ("gpu", "cuda"):
        return -1
    if accelerator != "auto":
        raise ValueError(f"invalid trainer.accelerator={accelerator!r} for trainer=ddp; allowed: auto|cpu|gpu|cuda")
    return -1 if torch.cuda.is_available() else cpu_processes
