"""Scale-out: one run on several processes (torchrun, DistributedDataParallel) and many runs on Ray.

``torchrun --nproc_per_node N -m vptune.cli train ...`` needs nothing else: :func:`fit` sees the process group
variables torchrun sets, splits every global batch across the processes, and only rank 0 writes files and shows
progress. ``vptune sweep/bench --backend ray`` sends each run of a sweep to a Ray worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable

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


def ray_executor(address: str | None) -> Callable:
    """Run sweep specs as Ray tasks (one CPU each, one GPU each where the cluster has GPUs); results as they land."""
    try:
        import ray
    except ImportError as error:
        raise ImportError("--backend ray needs Ray: pip install 'vptune[ray]'") from error

    def execute(specs: list[dict], finished: Callable[[dict, dict], None]) -> None:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False) if address else ray.init(
                include_dashboard=False, log_to_driver=False
            )
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(_ray_run)
        pending = {remote.remote(spec): spec for spec in specs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                finished(pending.pop(ref), ray.get(ref))

    return execute


def _ray_run(spec: dict) -> dict:
    from .sweep import execute_run

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return execute_run(spec)
