"""The training engine shared by ``vptune.fit`` and the CLI: SGD, warmup + cosine per step, JSON-lines metrics."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import option, to_dict
from .data import SPLITS, TaskData, load_split, normalize, open_task
from .model import TaskModel

METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """How a task model is trained (VPT.md, "Training protocol")."""

    epochs: int = option(100, "training epochs")
    warmup_epochs: float = option(
        10, "linear warmup epochs (at most epochs), then cosine decay; stepped every iteration"
    )
    batch_size: int = option(64, "images per step")
    base_lr: float = option(0.1, "base learning rate; the actual lr is base_lr * batch_size / 256")
    weight_decay: float = option(1e-4, "weight decay")
    momentum: float = option(0.9, "SGD momentum")
    seed: int = option(0, "seed for initialisation, shuffling and dropout: same seed, same result on CPU")
    train_split: str = option("train", "split to train on (train, trainval)", choices=SPLITS)
    val_split: str | None = option("val", "split scored after every epoch; none to skip", choices=SPLITS)
    test_split: str | None = option("test", "split scored once at the end; none to skip", choices=SPLITS)
    device: str = option("auto", "cpu, cuda, cuda:1 ... or auto")
    precision: str = option(
        "auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32", choices=("auto", "bf16", "fp32")
    )
    eval_batch_size: int = option(256, "images per evaluation batch")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        checks = (
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.base_lr > 0, f"base_lr must be > 0, got {self.base_lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

    @property
    def lr(self) -> float:
        """The actual peak learning rate: base_lr * batch_size / 256."""
        return self.base_lr * self.batch_size / 256


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate for 0-based ``step``: linear warmup from peak/warmup (never 0), then cosine to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


@dataclass
class Splits:
    """Datasets for one run; ``val`` and ``test`` may be missing."""

    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None


def load_splits(data: str | os.PathLike | TaskData, config: TrainConfig, image_size: int) -> Splits:
    """Open a task (name, folder or TaskData) and load the splits the config asks for."""
    task = data if isinstance(data, TaskData) else open_task(data)
    train = load_split(task, config.train_split, image_size, train=True, seed=config.seed)
    val = load_split(task, config.val_split, image_size) if config.val_split else None
    test = load_split(task, config.test_split, image_size) if config.test_split else None
    return Splits(train, val, test)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _batches(model: TaskModel, loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    mean, std = model.backbone.mean, model.backbone.std
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        yield normalize(images, mean, std), labels.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: TaskModel,
    dataset: Dataset,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> dict:
    """Accuracy and mean cross-entropy of ``model`` on ``dataset`` (uint8 images, int labels)."""
    device = resolve_device(device) if isinstance(device, str) else device
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, labels in _batches(model, loader, device):
        with _autocast(device, precision):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += labels.numel()
    model.train(was_training)
    return {"accuracy": correct / max(1, count), "loss": loss_sum / max(1, count), "count": count}


def fit(
    model: TaskModel,
    data: str | os.PathLike | TaskData | Splits,
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``model``'s trainable tensors; return the final metrics.

    Args:
        model: from :func:`vptune.build`; the backbone stays frozen and in eval mode.
        data: a task name (``"eurosat"``), a task folder, a :class:`TaskData`, or ready :class:`Splits`.
        config: the training configuration (default :class:`TrainConfig`).
        out_dir: when given, one JSON line per epoch is written to ``out_dir/metrics.jsonl``.
        on_epoch_end: called with the epoch's metrics after each epoch (e.g. to save the task so far).

    Raises:
        TrainingDiverged: the loss became NaN or infinite (epoch, step and lr in the message); files
            written so far stay valid.
    """
    config = config or TrainConfig()
    splits = data if isinstance(data, Splits) else load_splits(data, config, model.image_size)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model.to(device).train()
    model.record = {**model.record, "train_config": to_dict(config)}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    shuffle = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        splits.train, config.batch_size, shuffle=True, generator=shuffle, pin_memory=device.type == "cuda"
    )
    total, warmup = config.epochs * len(loader), round(min(config.warmup_epochs, config.epochs) * len(loader))
    log = _MetricsLog(out_dir)

    def score(dataset: Dataset) -> float:
        return evaluate(model, dataset, config.eval_batch_size, device, config.precision)["accuracy"]

    metrics: dict = {}
    for epoch in range(1, config.epochs + 1):
        start, step = time.perf_counter(), (epoch - 1) * len(loader)
        train = _train_epoch(model, loader, optimizer, config, device, epoch, step, total, warmup)
        metrics = {"epoch": epoch, **train, "seconds": round(time.perf_counter() - start, 3)}
        if splits.val is not None:
            metrics["val_accuracy"] = score(splits.val)
        log.write(metrics)
        model.record["metrics"] = metrics
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    if splits.test is not None:
        metrics["test_accuracy"] = score(splits.test)
        log.write({"final": True, **metrics})
    model.eval()
    return metrics


def _train_epoch(model, loader, optimizer, config, device, epoch, step, total, warmup) -> dict:
    loss_sum, correct, count = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress, leave=False)
    for images, labels in _batches(model, bar, device):
        lr = lr_at(step, total, warmup, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, config.precision):
            logits = model(images).float()
        loss = F.cross_entropy(logits, labels)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at epoch {epoch}, step {step + 1} (lr {lr:.4g}): "
                "lower --base-lr or --weight-decay; files written so far are intact"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        loss_sum += loss.item() * labels.numel()
        correct += (logits.argmax(1) == labels).sum().item()
        count += labels.numel()
        bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}", lr=f"{lr:.3g}")
    return {"train_loss": loss_sum / max(1, count), "train_accuracy": correct / max(1, count), "lr": lr}


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
            handle.write(json.dumps(metrics) + "\n")
            handle.flush()
