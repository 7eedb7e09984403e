"""The one training loop: a step and an epoch for one model or K configurations trained together.

:func:`fit` trains one model (K = 1, through a torch optimiser, under torchrun too); :func:`vptune.batched.fit_batched`
trains K configurations stacked in one model (row k of every trained tensor is configuration k) through a row-wise
SGD. Both run the same :func:`train_step`: the logits, each configuration's loss, the backward, the checks before the
update (a non-finite loss or gradient, a loss above ``max_loss``), the update, the check after it (the trained
tensors still finite), and each configuration's loss and accuracy. A configuration that fails a check stops there
(:meth:`Trainee.stop`): :func:`fit` raises :class:`~vptune.engine.TrainingDiverged`; K configurations go on without
it, each computing exactly what it computes alone.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data import TaskData
from .distributed import init_process_group, is_main, local_device, rank, world_size
from .engine import (
    METRICS,
    Splits,
    Stage,
    TrainConfig,
    Training,
    TrainingDiverged,
    autocast,
    lr_at,
    make_optimizer,
    prepare,
    resolve_device,
)
from .model import TaskModel

Update = Callable[[torch.Tensor], None]  # the optimiser step, given each configuration's lr (K,)


@dataclass
class Trainee:
    """What one pass trains: one model, or K configurations stacked in one model (``stacked``).

    Attributes:
        stage: how batches reach the model (pixels, or cached trunk outputs).
        module: what computes the training logits: the model, or its DistributedDataParallel / compiled wrapper.
        configs: each configuration's training config.
        update: the optimiser step.
        stacked: row k of every trained tensor is configuration k (task id k).
        live: the configurations still training.
        diverged: the configurations that stopped, and why.
        on_stop: called with a configuration and the reason it stopped (:func:`fit`: raises).
    """

    stage: Stage
    module: torch.nn.Module
    configs: list[TrainConfig]
    update: Update
    stacked: bool = False
    live: list[int] = field(default_factory=list)
    diverged: dict[int, str] = field(default_factory=dict)
    on_stop: Callable[[int, str], None] | None = None

    def __post_init__(self) -> None:
        self.live = self.live or list(range(len(self.configs)))
        self.params = [p for p in self.stage.model.parameters() if p.requires_grad]

    @property
    def rows(self) -> int:
        """Rows of every trained tensor that are configurations (1 for one unstacked model)."""
        return len(self.configs) if self.stacked else 1

    def logits(self, inputs: torch.Tensor, training: bool = True) -> torch.Tensor:
        """The live configurations' logits, configuration-major: (len(live) * B, C)."""
        module = self.module if training else self.stage.model
        if not self.stacked:
            return self.stage.logits(inputs, module)
        ids = torch.tensor(self.live, device=inputs.device).repeat_interleave(inputs.shape[0])
        repeated = inputs.repeat(len(self.live), *[1] * (inputs.dim() - 1))
        return module(repeated, ids, start=self.stage.point)

    def stop(self, config: int, reason: str) -> None:
        """Configuration ``config`` stops training: it diverged for ``reason``."""
        self.live.remove(config)
        self.diverged[config] = reason
        if self.on_stop is not None:
            self.on_stop(config, reason)


def row_norms(tensors: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The 2-norm of row k of all ``tensors`` together, for each k: (rows,) (rows 1: the norm of them all)."""
    if rows == 1:
        return torch.nn.utils.get_total_norm([tensor.detach() for tensor in tensors]).reshape(1)
    total = torch.zeros(rows, dtype=torch.float64, device=tensors[0].device if tensors else None)
    for tensor in tensors:
        norms = torch.linalg.vector_norm(tensor.detach().reshape(rows, -1), dim=1)
        total = total + norms.double().square()
    return total.sqrt()


def train_step(
    trainee: Trainee, inputs: torch.Tensor, labels: torch.Tensor, lrs: torch.Tensor, epoch: int, step: int
) -> torch.Tensor:
    """One step of the live configurations; returns each one's (loss sum, correct, count) over the batch, (K, 3).

    Before the update: a configuration whose loss is NaN or infinite or above its ``max_loss``, or whose gradient is
    not finite, stops (its loss kept out of the backward, so that the others' gradients are their own); after it,
    one whose trained tensors are no longer finite. Agreed between processes under torchrun.
    """
    live = list(trainee.live)
    where = {k: f"training diverged at epoch {epoch}, step {step + 1} (lr {float(lrs[k]):.4g})" for k in live}
    with autocast(inputs.device, trainee.configs[live[0]].precision):
        logits = trainee.logits(inputs).float()
    targets = labels.repeat(len(live))
    losses = F.cross_entropy(logits, targets, reduction="none").view(len(live), -1).mean(dim=1)
    _backward(trainee, live, losses, where)
    trainee.update(lrs)
    weights = row_norms(trainee.params, trainee.rows).tolist()
    for k in [k for k in trainee.live if k in where and not math.isfinite(weights[k if trainee.stacked else 0])]:
        trainee.stop(k, f"{where[k]}: the update made the trained tensors non-finite; lower --base-lr")
    correct = (logits.argmax(dim=1) == targets).view(len(live), -1).sum(dim=1).double()
    count = torch.full_like(correct, labels.numel())
    sums = torch.zeros(len(trainee.configs), 3, dtype=torch.float64, device=inputs.device)
    sums[live] = torch.stack([losses.detach().double() * labels.numel(), correct, count], dim=1)
    return sums


def _backward(trainee: Trainee, live: list[int], losses: torch.Tensor, where: dict[int, str]) -> None:
    """The gradients of the sound losses; a configuration whose loss or gradient is not stops."""
    limits = [math.inf if trainee.configs[k].max_loss is None else trainee.configs[k].max_loss for k in live]
    sound = torch.isfinite(losses) & (losses <= torch.tensor(limits, device=losses.device))
    for param in trainee.params:
        param.grad = None
    torch.where(sound, losses, torch.zeros_like(losses)).sum().backward()
    grads = [p.grad for p in trainee.params if p.grad is not None]  # a tensor the loss did not reach adds 0
    norms = row_norms(grads, trainee.rows)[live if trainee.stacked else [0]].to(losses.device)
    bad = (~sound | ~torch.isfinite(norms)).float()
    if dist.is_initialized():
        dist.all_reduce(bad)
    for k, loss, norm, limit, failed in zip(live, losses.tolist(), norms.tolist(), limits, bad.tolist(), strict=True):
        if failed:
            over = f" (the limit: max_loss {limit:g})" if loss > limit else ""
            trainee.stop(k, f"{where[k]}: loss {loss:.4g}, gradient norm {norm:.4g}{over}; lower --base-lr")


def train_epoch(trainee: Trainee, training: Training, epoch: int) -> dict[int, dict]:
    """One epoch of the live configurations, then their val scores: each one's metrics (those that stopped during
    it have none)."""
    first = trainee.configs[0]
    training.sampler.set_epoch(epoch)
    start, step, end = time.perf_counter(), (epoch - 1) * training.steps, epoch * training.steps
    sums = torch.zeros(len(trainee.configs), 3, dtype=torch.float64)
    highest = torch.zeros(len(trainee.configs), dtype=torch.float64)
    quiet = not first.progress or not is_main()
    epochs = training.total // training.steps
    bar = tqdm(training.loader, f"epoch {epoch}/{epochs}", total=training.steps, disable=quiet, leave=False)
    for inputs, labels in training.stage.batches(bar, training.device):
        lrs = torch.tensor(
            [lr_at(step, training.total, training.warmup, config.lr) for config in trainee.configs], dtype=torch.float64
        )
        highest = torch.maximum(highest, lrs)
        sums += train_step(trainee, inputs, labels, lrs, epoch, step).cpu()
        step += 1
        if not trainee.live or step == end:
            break
        if not quiet:
            loss, correct, count = sums[trainee.live[0]].tolist()
            bar.set_postfix(loss=f"{loss / count:.3f}", acc=f"{correct / count:.3f}", lr=f"{lrs[trainee.live[0]]:.3g}")
    if dist.is_initialized():
        dist.all_reduce(sums)  # every process reports the whole epoch
    seconds = round(time.perf_counter() - start, 3)
    metrics = {k: _epoch_metrics(epoch, sums[k], float(lrs[k]), float(highest[k]), seconds) for k in trainee.live}
    for k in metrics:
        metrics[k]["cached_from"] = training.stage.point
    if training.splits.val is not None:
        start = time.perf_counter()
        for k, accuracy in scores(trainee, training, training.splits.val, "val").items():
            metrics[k]["val_accuracy"] = accuracy
        for k in metrics:
            metrics[k]["val_seconds"] = round(time.perf_counter() - start, 3)
    return {k: metrics[k] for k in trainee.live}


def _epoch_metrics(epoch: int, sums: torch.Tensor, lr: float, peak: float, seconds: float) -> dict:
    loss, correct, count = sums.tolist()
    return {
        "epoch": epoch, "train_loss": loss / max(1, count), "train_accuracy": correct / max(1, count), "lr": lr,
        "lr_peak": peak, "seconds": seconds,
    }  # fmt: skip


@torch.no_grad()
def scores(trainee: Trainee, training: Training, dataset: Dataset, split: str) -> dict[int, float]:
    """Each live configuration's accuracy on ``dataset`` through the training stage; one whose logits are NaN or
    infinite stops (training diverged)."""
    model, config = trainee.stage.model, trainee.configs[0]
    was_training = model.training
    model.eval()
    live = list(trainee.live)
    hits = torch.zeros(len(live), dtype=torch.long)
    finite = torch.ones(len(live), dtype=torch.bool)
    count = 0
    loader = DataLoader(dataset, batch_size=config.eval_batch_size)
    for inputs, labels in trainee.stage.batches(loader, training.device):
        with autocast(training.device, config.precision):
            logits = trainee.logits(inputs, training=False).float().view(len(live), labels.numel(), -1)
        finite &= torch.isfinite(logits).flatten(1).all(dim=1).cpu()
        hits += (logits.argmax(dim=-1) == labels).sum(dim=1).cpu()
        count += labels.numel()
    model.train(was_training)
    for k, ok in zip(live, finite.tolist(), strict=True):
        if not ok:
            trainee.stop(k, f"training diverged: the model's outputs on {split} are NaN or infinite")
    return {k: hit / max(1, count) for k, hit, ok in zip(live, hits.tolist(), finite.tolist(), strict=True) if ok}


def fit(
    model: TaskModel,
    data: str | os.PathLike | TaskData | Splits,
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    on_epoch_end: Callable[[dict], int | None] | None = None,
) -> dict:
    """Train ``model``'s trainable tensors; return the final metrics.

    Args:
        model: from :func:`vptune.build`; the backbone stays frozen and in eval mode.
        data: a task name (``"eurosat"``), a task folder, a :class:`TaskData`, or ready :class:`Splits`.
        config: the training configuration (default :class:`TrainConfig`); unset ``base_lr`` and ``optimizer``
            take the method's defaults.
        out_dir: when given, one JSON line per epoch is written to ``out_dir/metrics.jsonl``.
        on_epoch_end: called with the epoch's metrics after each epoch (e.g. to save the task so far); when it
            returns a number of epochs below the run's, the run ends after that many (at least the epochs done), its
            cosine decaying to 0 over the new length (a sweep keeping to its time budget; one process only).

    When the part of the network before the first trained tensor is frozen and prompt-free and the train split
    has no augmentation (``config.cache="auto"``), that part runs once per image and training continues from its
    cached output: the same result as running the whole network, at a fraction of the cost.

    Raises:
        TrainingDiverged: a loss, gradient or trained tensor became NaN or infinite, or the loss passed its limit
            (epoch, step and lr in the message); files written so far stay valid.
    """
    config = (config or TrainConfig()).for_method(model.method)
    device = local_device(resolve_device(config.device))
    world = world_size() if init_process_group(device) else 1
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {world} processes")
    training = prepare(model, data, config, device, world, rank())
    torch.manual_seed(config.seed)
    model.train()
    trainee = Trainee(training.stage, _wrapped(model, config, world), [config], _optimizer_step(model, config))
    trainee.on_stop = _raise
    log = _MetricsLog(out_dir if is_main() else None)
    metrics: dict = {}
    epochs, epoch = config.epochs, 0
    with model.recomputing(recomputed_blocks(model, config)):
        while epoch < epochs:
            epoch += 1
            metrics = train_epoch(trainee, training, epoch)[0]
            log.write(metrics)
            shorter = on_epoch_end(metrics) if on_epoch_end is not None and is_main() else None
            if shorter is not None and shorter < epochs and world == 1:
                epochs = max(epoch, shorter)
                training.shorten(epochs)
    if epochs < config.epochs:
        metrics["shortened_to"] = epochs
    if training.splits.test is not None:
        metrics["test_accuracy"] = scores(trainee, training, training.splits.test, "test")[0]
        log.write({"final": True, **metrics})
    model.eval()
    return metrics


def recomputed_blocks(model: TaskModel, config: TrainConfig) -> int:
    """The blocks a run recomputes in the backward pass (gradient checkpointing): the first K, or every block."""
    return config.checkpoint_blocks or (model.backbone.depth if config.checkpointing else 0)


def _wrapped(model: TaskModel, config: TrainConfig, world: int) -> torch.nn.Module:
    """What computes the training logits: the model, across processes, compiled, as the config asks."""
    module = DistributedDataParallel(model) if world > 1 else model
    return torch.compile(module) if config.compile else module


def _optimizer_step(model: TaskModel, config: TrainConfig) -> Update:
    optimizer = make_optimizer(model, config)

    def step(lrs: torch.Tensor) -> None:
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[0])
        optimizer.step()

    return step


def _raise(config: int, reason: str) -> None:
    raise TrainingDiverged(reason)


class _MetricsLog:
    """Appends one JSON object per line; each line is written whole and flushed."""

    def __init__(self, out_dir: str | os.PathLike | None):
        self.path = Path(out_dir) / METRICS if out_dir is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")  # a new run starts a new log

    def write(self, metrics: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(metrics, allow_nan=False) + "\n")
            handle.flush()
