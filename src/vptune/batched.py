"""K configurations in one pass: K prompt sets and heads of one structure train together on a frozen backbone.

Every batch is loaded once and runs through the backbone as one batch of K*B (sample i of configuration k uses
prompt set and head k); the loss is the sum of the K configurations' mean losses, so each configuration's gradient
is exactly its own. Each configuration keeps its own lr schedule, weight decay and momentum (:func:`stacked_sgd_step`
applies them row by row). Equal to K separate :func:`vptune.fit` runs that share the sample order
(``data_seed``) and have no prompt dropout; the test holds them to 1e-5.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .data import TaskData
from .engine import Splits, Stage, TrainConfig, Training, TrainingDiverged, autocast, lr_at, prepare, resolve_device
from .methods import METHODS, get_method
from .model import TaskModel
from .stacking import stack, stackable, unstack

SHARED_FIELDS = (
    "epochs", "warmup_epochs", "batch_size", "train_split", "val_split", "test_split", "precision", "cache", "device",
)  # fmt: skip


def fit_batched(
    models: list[TaskModel], data: str | os.PathLike | TaskData | Splits, configs: list[TrainConfig]
) -> list[dict]:
    """Train ``models[k]`` with ``configs[k]`` for every k in one pass; each model ends with its trained tensors.

    All models share the backbone, method, prompt structure and input size; the configs may differ in base lr,
    weight decay, momentum and seed (initialisation), and share the schedule and the sample order
    (``configs[0].data_seed``, default its seed).
    """
    configs = [config.for_method(models[0].method) for config in configs]
    _check(models, configs)
    first = configs[0]
    stacked = stack(models)
    training = prepare(stacked, data, first, resolve_device(first.device))
    params = [p for p in stacked.parameters() if p.requires_grad]
    decays = [p is not stacked.classifier.bias for p in params]  # as fit: no weight decay on the head's bias
    buffers: list[torch.Tensor | None] = [None] * len(params)
    history: list[list[dict]] = [[] for _ in models]
    stacked.train()
    torch.manual_seed(first.seed)
    for epoch in range(1, first.epochs + 1):
        for log, metrics in zip(history, _epoch(training, params, decays, buffers, configs, epoch), strict=True):
            log.append(metrics)
    if training.splits.test is not None:
        accuracies = _accuracies(training.stage, training.splits.test, len(models), first, training.device)
        for log, accuracy in zip(history, accuracies, strict=True):
            log[-1]["test_accuracy"] = accuracy
    unstack(stacked, models)
    return [log[-1] for log in history]


def _epoch(training: Training, params, decays, buffers, configs: list[TrainConfig], epoch: int) -> list[dict]:
    """One epoch for every configuration; each one's metrics."""
    first, k, device = configs[0], len(configs), training.device
    training.sampler.set_epoch(epoch)
    start, step = time.perf_counter(), (epoch - 1) * len(training.loader)
    sums = torch.zeros(k, 2, dtype=torch.float64)
    for inputs, labels in training.stage.batches(training.loader, device):
        lrs = torch.tensor([lr_at(step, training.total, training.warmup, c.lr) for c in configs])
        losses = _step(training.stage, inputs, labels, k, first, device, epoch, step)
        sums[:, 0] += losses.detach().double() * labels.numel()
        sums[:, 1] += labels.numel()
        stacked_sgd_step(params, buffers, lrs, configs, decays)
        step += 1
    seconds = time.perf_counter() - start
    val = (
        _accuracies(training.stage, training.splits.val, k, first, device) if training.splits.val is not None else None
    )
    epochs = []
    for index in range(k):
        metrics = {"epoch": epoch, "train_loss": float(sums[index, 0] / sums[index, 1]), "lr": float(lrs[index])}
        metrics.update({"seconds": round(seconds, 3), "cached_from": training.stage.point, "batched": k})
        if val is not None:
            metrics["val_accuracy"] = val[index]
        epochs.append(metrics)
    return epochs


def _step(stage: Stage, inputs, labels, k: int, config, device, epoch: int, step: int) -> torch.Tensor:
    batch = labels.numel()
    ids = torch.arange(k, device=device).repeat_interleave(batch)
    with autocast(device, config.precision):
        logits = stage.model(inputs.repeat(k, *[1] * (inputs.dim() - 1)), ids, start=stage.point).float()
    losses = F.cross_entropy(logits, labels.repeat(k), reduction="none").view(k, batch).mean(dim=1)
    if not torch.isfinite(losses).all():
        bad = [i for i, loss in enumerate(losses.tolist()) if not torch.isfinite(torch.tensor(loss))]
        raise TrainingDiverged(f"configurations {bad} diverged at epoch {epoch}, step {step + 1}")
    for param in stage.model.parameters():
        param.grad = None
    losses.sum().backward()
    return losses


@torch.no_grad()
def stacked_sgd_step(
    params: list[nn.Parameter],
    buffers: list[torch.Tensor | None],
    lrs: torch.Tensor,
    configs: list[TrainConfig],
    decays: list[bool] | None = None,
) -> None:
    """``torch.optim.SGD`` (momentum, weight decay) applied to row k of every stacked tensor with config k's values;
    ``decays[i]`` False: no weight decay on ``params[i]``."""
    for index, param in enumerate(params):
        shape = (-1,) + (1,) * (param.dim() - 1)
        decayed = decays is None or decays[index]
        rates = [c.weight_decay if decayed else 0.0 for c in configs]
        decay = torch.tensor(rates, dtype=param.dtype, device=param.device).view(shape)
        momentum = torch.tensor([c.momentum for c in configs], dtype=param.dtype, device=param.device).view(shape)
        step = param.grad + decay * param
        buffers[index] = step.clone() if buffers[index] is None else momentum * buffers[index] + step
        param -= lrs.to(param.dtype).to(param.device).view(shape) * buffers[index]


@torch.no_grad()
def _accuracies(stage: Stage, dataset: Dataset, k: int, config: TrainConfig, device) -> list[float]:
    was_training = stage.model.training
    stage.model.eval()
    correct, count = torch.zeros(k, dtype=torch.long), 0
    for inputs, labels in stage.batches(DataLoader(dataset, batch_size=config.eval_batch_size), device):
        ids = torch.arange(k, device=device).repeat_interleave(labels.numel())
        with autocast(device, config.precision):
            logits = stage.model(inputs.repeat(k, *[1] * (inputs.dim() - 1)), ids, start=stage.point).float()
        hits = (logits.argmax(dim=1) == labels.repeat(k)).view(k, -1)
        correct += hits.sum(dim=1).cpu()
        count += labels.numel()
    stage.model.train(was_training)
    return [hits / max(1, count) for hits in correct.tolist()]


def _check(models: list[TaskModel], configs: list[TrainConfig]) -> None:
    if not models or len(models) != len(configs):
        raise ValueError(f"give one config per model: {len(models)} models, {len(configs)} configs")
    first = models[0]
    if not get_method(first.method)[0].batchable:
        raise ValueError(f"method {first.method!r} cannot be batched; batchable: {', '.join(batchable_methods())}")
    if any(getattr(model.prompts, "tokens_pending", False) for model in models):
        raise ValueError(
            "prompts with init 'tokens' or 'scaled-tokens' are drawn from the training images when each run's "
            "training starts: train such models one at a time (not batched)"
        )
    if not stackable(first):
        raise ValueError("prompts with a projection or an input channel cannot be batched (per-config modules)")
    for model in models[1:]:
        same = (model.method, model.prompt_config, model.image_size, model.num_classes) == (
            first.method, first.prompt_config, first.image_size, first.num_classes
        )  # fmt: skip
        if not same or model.backbone is not first.backbone:
            raise ValueError("batched models must share backbone, method, prompt config, input size and classes")
    for name in SHARED_FIELDS:
        values = {getattr(config, name) for config in configs}
        if len(values) > 1:
            raise ValueError(f"batched configs must share {name}; got {sorted(values, key=str)}")
    if any(config.optimizer != "sgd" for config in configs):
        raise ValueError("batched training implements SGD only; run AdamW configurations one by one")


def batchable_methods() -> list[str]:
    """The registered methods whose configurations train together."""
    return [name for name, method in METHODS.items() if method.batchable]
