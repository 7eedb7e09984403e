"""One run on several processes (torchrun, DistributedDataParallel).

``torchrun --nproc_per_node N -m vptune.cli train ...`` needs nothing else: :func:`vptune.fit` sees the process
group variables torchrun sets, splits every global batch across the processes, and only rank 0 writes files and
shows progress. (Many runs on many machines: the sweep's Ray backend, :mod:`vptune.sweep.ray`.)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in this run: ``WORLD_SIZE`` as torchrun sets it, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or not distributed): the process that writes files and shows progress."""
    return rank() == 0


def init_process_group(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); False when not distributed."""
    if world_size() == 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def local_device(device: torch.device) -> torch.device:
    """On CUDA, each process takes the GPU of its ``LOCAL_RANK``."""
    if device.type == "cuda" and world_size() > 1 and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
