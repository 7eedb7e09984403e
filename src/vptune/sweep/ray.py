"""The Ray executor: each run of a sweep as a Ray task (``pip install 'vptune[ray]'``)."""

from __future__ import annotations

import os

import torch

from .execute import Finished, execute


def ray_executor(address: str | None):
    """Run sweep entries as Ray tasks (one CPU each, one GPU each where the cluster has GPUs); results as they land."""
    try:
        import ray
    except ImportError as error:
        raise ImportError("--backend ray needs Ray: pip install 'vptune[ray]'") from error

    def run_all(entries: list[dict], finished: Finished) -> None:
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False}
            ray.init(address=address, **options) if address else ray.init(**options)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(_on_worker)
        pending = {remote.remote(entry): entry for entry in entries}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                finished(pending.pop(ref), ray.get(ref))

    return run_all


def _on_worker(entry: dict) -> dict:
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return execute(entry)
