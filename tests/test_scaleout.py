"""Scale-out: one run on two processes (torchrun, gloo) equals one process; sweep runs on a local Ray of 2 workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vptune.sweep.executors
from vptune.sweep import Budget, make_executor, plan_sweep, run_sweep

TINY = Budget("tiny", image_size=16, epochs=2, warmup_epochs=1, batch_size=8, seeds=2, wds=(0.0,), note="test")


def train_command(out: Path, backbone: str, task: Path) -> list[str]:
    args = ["train", "--data", str(task), "--backbone", backbone, "--image-size", "16", "--out", str(out)]
    args += ["--method", "vpt-deep", "--num-tokens", "2", "--dropout", "0", "--epochs", "2", "--warmup-epochs", "1"]
    return args + ["--batch-size", "8", "--base-lr", "1", "--no-progress"]


def run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_equal_one_at_the_same_global_batch(tmp_path, saved_backbone, tiny_task) -> None:
    """Tolerance 1e-5 on every trained tensor: both see the same global batches, only summation order differs."""
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "vptune.cli", *train_command(one, saved_backbone, tiny_task)])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*torchrun, "-m", "vptune.cli", *train_command(two, saved_backbone, tiny_task)])
    single, double = load_file(one / "weights.safetensors"), load_file(two / "weights.safetensors")
    assert single.keys() == double.keys()
    prompt = vptune.PromptConfig(num_tokens=2)
    start = vptune.build("vpt-deep", vptune.load_backbone(saved_backbone), 3, prompt, 16).task_state_dict()
    for name in single:
        assert not torch.equal(single[name], start[name])  # it trained
        torch.testing.assert_close(double[name], single[name], atol=1e-5, rtol=0)
    metrics = [json.loads((folder / "vptune.json").read_text())["metrics"] for folder in (one, two)]
    assert metrics[0]["val_accuracy"] == metrics[1]["val_accuracy"]
    assert metrics[0]["train_loss"] == pytest.approx(metrics[1]["train_loss"], abs=1e-5)  # all processes' samples
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 3  # written once (rank 0), 2 epochs + final


def test_ray_backend_gives_the_local_results_and_resumes_locally(
    tmp_path, saved_backbone, tiny_task, monkeypatch
) -> None:
    ray = pytest.importorskip("ray")
    plan = plan_sweep(str(tiny_task), "vpt-shallow", TINY, saved_backbone, lrs=[2.0, 0.5], num_tokens=[2])
    local = run_sweep(plan, tmp_path / "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.cluster_resources()["CPU"] == 2
        remote = run_sweep(plan, tmp_path / "ray", make_executor("ray"))
    finally:
        ray.shutdown()
    assert remote["grid"] == local["grid"] and remote["choice"] == local["choice"]
    assert remote["test_accuracy"] == pytest.approx(local["test_accuracy"], abs=1e-9)
    calls: list[str] = []
    monkeypatch.setattr(vptune.sweep.executors, "execute", lambda entry: calls.append(entry["id"]))
    assert run_sweep(plan, tmp_path / "ray")["test_accuracy"] == remote["test_accuracy"]  # resumed with local
    assert calls == []
