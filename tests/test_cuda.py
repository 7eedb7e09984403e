"""On a CUDA device: the same numbers as on the CPU, bf16 autocast, the engine's GPU path, serving and the harness.

Skipped where there is no GPU (CI); run on a lent GPU with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE, pixels, tiny_backbone, tiny_dataset

import vptune
from vptune import perf
from vptune.engine import Splits, TrainConfig
from vptune.multitask import MultiTask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
METHODS = ("vpt-deep", "vpt-shallow", "linear", "bias", "adapter", "lora", "full")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 on the GPU without TF32, so that it matches the CPU to rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def model_for(method: str, backbone: vptune.Backbone) -> vptune.TaskModel:
    prompt = vptune.PromptConfig(num_tokens=3, dropout=0.0) if method.startswith("vpt") else None
    return vptune.build(method, backbone, 3, prompt, IMAGE, seed=0)


def loss_and_grads(model: vptune.TaskModel, x: torch.Tensor, labels: torch.Tensor, precision: str = "fp32"):
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x).float()
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
    return logits.detach().cpu(), grads


@pytest.mark.parametrize("method", METHODS)
def test_gpu_step_equals_cpu_step(family: str, method: str) -> None:
    x, labels = pixels(tiny_backbone(family), batch=4), torch.tensor([0, 1, 2, 0])
    on_cpu = model_for(method, tiny_backbone(family)).train()
    on_gpu = model_for(method, tiny_backbone(family)).to(CUDA).train()
    cpu_logits, cpu_grads = loss_and_grads(on_cpu, x, labels)
    gpu_logits, gpu_grads = loss_and_grads(on_gpu, x.to(CUDA), labels.to(CUDA))
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=1e-4, rtol=1e-4)
    assert gpu_grads.keys() == cpu_grads.keys()
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("method", ["vpt-deep", "lora", "full"])
def test_bf16_autocast_step_is_close_to_fp32(method: str) -> None:
    backbone = tiny_backbone("dinov2")
    x, labels = pixels(backbone, batch=8).to(CUDA), torch.arange(8, device=CUDA) % 3
    model = model_for(method, backbone).to(CUDA).train()
    fp32_logits, fp32_grads = loss_and_grads(model, x, labels)
    bf16_logits, bf16_grads = loss_and_grads(model, x, labels, "bf16")
    assert not torch.equal(bf16_logits, fp32_logits)  # autocast did run in bf16
    torch.testing.assert_close(bf16_logits, fp32_logits, atol=0.05, rtol=0.05)
    assert all(grad.dtype == torch.float32 for grad in bf16_grads.values())  # parameters and gradients stay fp32
    ours, theirs = (torch.cat([g[name].flatten() for name in fp32_grads]) for g in (bf16_grads, fp32_grads))
    assert F.cosine_similarity(ours, theirs, dim=0) > 0.99
    for name, grad in fp32_grads.items():  # each tensor, but those whose gradient is ~0 (a key bias's is exactly 0)
        if grad.norm() > 1e-3 * theirs.norm():
            assert (bf16_grads[name] - grad).norm() < 0.1 * grad.norm(), name


def test_fit_on_gpu_learns_and_saves_a_task_that_loads_on_cpu(tmp_path) -> None:
    backbone, data = tiny_backbone("vit"), tiny_dataset(12)
    model = model_for("vpt-deep", backbone)
    before = vptune.evaluate(model, data, device="cuda")["loss"]
    config = TrainConfig(epochs=5, warmup_epochs=1, batch_size=4, base_lr=2.0, device="cuda", progress=False)
    metrics = vptune.fit(model, Splits(data), config)  # precision auto: bf16 autocast on CUDA, pinned batches
    assert next(model.parameters()).device.type == "cuda" and math.isfinite(metrics["train_loss"])
    assert vptune.evaluate(model, data, device="cuda")["loss"] < before / 2
    vptune.save_task(model, tmp_path / "task")
    reloaded = vptune.load_task(tmp_path / "task", backbone=tiny_backbone("vit"))
    x = pixels(backbone, batch=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x.to(CUDA)).cpu(), atol=1e-4, rtol=1e-4)
    vptune.save_task(model, tmp_path / "task")
    reloaded = vptune.load_task(tmp_path / "task", backbone=tiny_backbone("vit")).eval()
    x = pixels(backbone, batch=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x.to(CUDA)).cpu(), atol=1e-4, rtol=1e-4)


def test_mixed_task_batch_on_gpu_equals_each_task_alone() -> None:
    backbone = tiny_backbone("dinov2")
    tasks = [model_for(method, backbone).eval() for method in ("vpt-deep", "vpt-shallow", "linear")]
    served = MultiTask(backbone, tasks).to(CUDA)
    ids = torch.tensor([2, 0, 1, 1, 0, 2])
    x = pixels(backbone, batch=len(ids), seed=3)
    with torch.no_grad():
        logits = served(x.to(CUDA), ids.to(CUDA))
        for row, index in enumerate(ids.tolist()):
            alone = tasks[index].to(CUDA)(x[row : row + 1].to(CUDA))[0]
            torch.testing.assert_close(logits[row], alone, atol=1e-5, rtol=0)


def test_harness_measures_gpu_memory_and_flops(saved_backbone) -> None:
    args = perf._parser().parse_args(
        ["--backbone", saved_backbone, "--image-size", "16", "--batch-size", "4", "--device", "cuda",
         "--precision", "bf16", "--repeats", "2", "--warmup", "1"]
    )  # fmt: skip
    deep, full = perf.measure_method(args, "vpt-deep"), perf.measure_method(args, "full")
    assert deep["memory_kind"] == "cuda max allocated"
    assert 0 < deep["step_memory_bytes"] < full["step_memory_bytes"]
    assert 0 < deep["flops_per_image"] < full["flops_per_image"]


def test_training_batches_live_on_the_gpu() -> None:
    from torch.utils.data import DistributedSampler

    from vptune.data import ResidentBatches, train_batches

    dataset = tiny_dataset(10)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    batches = train_batches(dataset, 4, sampler, CUDA)
    assert isinstance(batches, ResidentBatches)
    images, labels = next(iter(batches))
    assert images.device.type == labels.device.type == "cuda" and images.dtype == torch.uint8
    first = list(sampler)[:4]
    assert torch.equal(images.cpu(), torch.stack([dataset[i][0] for i in first]))
