"""What training is set up from, shared by :func:`vptune.fit` and batched training: the training configuration, the
lr schedule (warmup + cosine per step), devices and precision, the optimisers, the data on its way to the model
(the cached frozen trunk) and evaluation. The loop itself is :mod:`vptune.loop`."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from tqdm.auto import tqdm

from .config import check_fields, option
from .data import SPLITS, TaskData, load_split, open_task, train_batches
from .methods import get_method
from .model import TaskModel
from .preprocessing import DataError, Preprocessing
from .prototypes import init_from_tokens
from .trunk_memory import active_memory, image_keys

METRICS = "metrics.jsonl"
WARMUP_SHARE = 0.1  # the paper: 10 warmup epochs of 100
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # an lr beyond it cannot reach an optimiser


@dataclass
class TrainConfig:
    """How a task model is trained (the paper's Sec. 4.1: SGD, warmup then cosine decay, the lr scaled by batch/256)."""

    epochs: int = option(100, "training epochs")
    warmup_epochs: float | None = option(
        None,
        "linear warmup epochs, then cosine decay, stepped every iteration; none: a tenth of the epochs (the "
        "paper's 10 of 100); one not shorter than the run is cut to a tenth, with a warning",
        shown="a tenth of the epochs",
    )
    batch_size: int = option(64, "images per step")
    epoch_steps: int | None = option(
        None,
        "steps per epoch at most: an epoch of a longer split trains on that many batches of its shuffled order, a "
        "new order each epoch (a schedule in steps, as a sweep with a time budget plans it); none: the whole split",
    )
    base_lr: float | None = option(
        None, "base learning rate; the actual lr is base_lr * batch_size / 256; none = the method's default"
    )
    weight_decay: float = option(1e-4, "weight decay (decoupled for adamw)")
    optimizer: str | None = option(
        None,
        "sgd or adamw; none (or auto): the method's",
        choices=("sgd", "adamw"),
        shown="the method's: adamw for full, sgd otherwise",
    )
    momentum: float = option(0.9, "SGD momentum")
    cache: str = option(
        "auto",
        "auto: compute the frozen, prompt-free part of the network once per image and train on that "
        "(when the train split has no augmentation); off: always run the whole network",
        choices=("auto", "off"),
    )
    checkpointing: bool = option(
        False, "gradient checkpointing: recompute each block in the backward pass (less memory, one more forward)"
    )
    checkpoint_blocks: int = option(
        0,
        "gradient checkpointing of the first K blocks only (K > 0 turns it on; 0: every block with --checkpointing); "
        "each block recomputed trades about 1/depth of the activation memory for 1/depth of a forward pass",
    )
    compile: bool = option(
        False,
        "torch.compile the training step's model (compiles in the first steps; pays off on long runs; "
        "dropout masks differ from the eager ones)",
    )
    seed: int = option(0, "seed for initialisation, shuffling and dropout: same seed, same result on CPU")
    data_seed: int | None = option(
        None, "seed of the sample order alone; batched sweeps share one", shown="the seed's value"
    )
    train_split: str = option("train", "split to train on (train, trainval)", choices=SPLITS)
    val_split: str | None = option("val", "split scored after every epoch; none to skip", choices=SPLITS)
    test_split: str | None = option("test", "split scored once at the end; none to skip", choices=SPLITS)
    device: str = option("auto", "cpu, cuda, cuda:1 ... or auto (CUDA when available)")
    precision: str = option(
        "auto", "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32", choices=("auto", "bf16", "fp32")
    )
    max_loss: float | None = option(
        1000.0, "a training loss above this stops the run as diverged (cross-entropy starts near ln C); none: no limit"
    )
    eval_batch_size: int = option(256, "images per evaluation batch")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.optimizer == "auto":  # the name it had before none meant the method's
            self.optimizer = None
        check_fields(self)
        checks = (
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (
                self.warmup_epochs is None or self.warmup_epochs >= 0,
                f"warmup_epochs must be >= 0, got {self.warmup_epochs}",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (
                self.epoch_steps is None or self.epoch_steps >= 1,
                f"epoch_steps must be >= 1 (or none: the whole split), got {self.epoch_steps}",
            ),
            (self.base_lr is None or self.base_lr > 0, f"base_lr must be > 0, got {self.base_lr}"),
            (
                self.base_lr is None or self.base_lr * self.batch_size / 256 <= FLOAT32_MAX,
                f"base_lr {self.base_lr} makes an lr beyond what a float32 holds ({FLOAT32_MAX:.3g}): lower it",
            ),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                self.checkpoint_blocks >= 0,
                f"checkpoint_blocks must be >= 0 (0 = every block), got {self.checkpoint_blocks}",
            ),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (_is_device(self.device), f"device must be auto, cpu, cuda, cuda:<index> ..., got {self.device!r}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

    @property
    def warmup(self) -> float:
        """The warmup in epochs: ``warmup_epochs``, or a tenth of the run when unset or not shorter than the run."""
        if self.warmup_epochs is None or (self.warmup_epochs >= self.epochs and self.warmup_epochs > 0):
            return WARMUP_SHARE * self.epochs
        return self.warmup_epochs

    @property
    def lr(self) -> float:
        """The actual peak learning rate: base_lr * batch_size / 256."""
        if self.base_lr is None:
            raise ValueError("TrainConfig.base_lr is unset: call for_method(method) first, or set base_lr")
        return self.base_lr * self.batch_size / 256

    def for_method(self, method: str) -> TrainConfig:
        """This config with what it leaves unset resolved: ``base_lr`` and ``optimizer`` left none take the
        method's defaults, ``warmup_epochs`` becomes :attr:`warmup` (with a warning when it was cut)."""
        spec = get_method(method)[0] if method != "custom" else None
        base_lr = self.base_lr if self.base_lr is not None else (spec.base_lr if spec else 0.1)
        optimizer = self.optimizer if self.optimizer is not None else (spec.optimizer if spec else "sgd")
        if self.warmup_epochs is not None and self.warmup != self.warmup_epochs:
            warnings.warn(
                f"warmup of {self.warmup_epochs:g} epochs is not shorter than the run's {self.epochs}: the lr would "
                f"never reach its peak; using {self.warmup:g} (a tenth of the run). Set --warmup-epochs below "
                "--epochs, or leave it unset",
                stacklevel=2,
            )
        return dataclasses.replace(self, base_lr=base_lr, optimizer=optimizer, warmup_epochs=self.warmup)


def _is_device(name: str) -> bool:
    if name == "auto":
        return True
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


class TrainingDiverged(RuntimeError):
    """Training diverged: a loss, gradient or trained tensor became NaN or infinite, or the loss passed its limit."""


class NonFiniteOutput(ValueError):
    """A model gave NaN or infinite logits: no score is computed from them."""


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


def load_splits(data: str | os.PathLike | TaskData, config: TrainConfig, preprocessing: Preprocessing | int) -> Splits:
    """Open a task (name, folder or TaskData) and load the splits the config asks for, as a model with this
    preprocessing sees them (an int: that input side, with the task's own protocol)."""
    task = data if isinstance(data, TaskData) else open_task(data)
    if isinstance(preprocessing, int):
        preprocessing = Preprocessing(preprocessing, protocol=task.protocol)
    if task.protocol != preprocessing.protocol:
        raise DataError(
            f"task {task.name} uses the {task.protocol} protocol ({task.layout} layout), the model was built for "
            f"{preprocessing.protocol}: build it with protocol={task.protocol!r}"
        )
    train = load_split(task, config.train_split, preprocessing, train=True, seed=config.seed)
    val = load_split(task, config.val_split, preprocessing) if config.val_split else None
    test = load_split(task, config.test_split, preprocessing) if config.test_split else None
    return Splits(train, val, test)


def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix units


def cpu_has_bf16_units(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bf16 matrix units (AMX or AVX512-BF16); None where ``cpuinfo`` cannot be read."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return None
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def warn_slow_bf16(device: torch.device, precision: str) -> None:
    """bf16 on a CPU without bf16 units is emulated: measured 34x slower than fp32 for a VPT-Deep step (see
    docs/performance.md), so say so."""
    if precision == "bf16" and device.type == "cpu" and cpu_has_bf16_units() is False:
        warnings.warn(
            "--precision bf16 on a CPU without bf16 units (no amx_bf16 or avx512_bf16 in /proc/cpuinfo) is emulated "
            "and far slower than fp32 (measured 34x for a VPT-Deep step); use --precision auto (fp32 on a CPU)",
            stacklevel=4,
        )


def autocast(device: torch.device, precision: str):
    """bf16 autocast where ``precision`` asks for it (``auto``: on CUDA), else a no-op context."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


@dataclass
class Stage:
    """How batches reach the model: pixels (``point`` 0) or cached trunk outputs entering at ``point``."""

    model: TaskModel
    point: int = 0

    def batches(self, loader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, labels)`` on ``device``: pixels normalised as the model's preprocessing says."""
        for inputs, labels in loader:
            inputs = inputs.to(device, non_blocking=True)
            inputs = self.model.preprocessing.normalize(inputs) if self.point == 0 else inputs
            yield inputs, labels.to(device, non_blocking=True)

    def logits(self, inputs: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor:
        """Logits through ``module`` (the model, or its DistributedDataParallel wrapper)."""
        return (self.model if module is None else module)(inputs, start=self.point)


@torch.no_grad()
def evaluate(
    model: TaskModel,
    dataset: Dataset,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    precision: str = "auto",
) -> dict:
    """Accuracy and mean cross-entropy of ``model`` on ``dataset`` (uint8 images, int labels); ``model`` is moved
    to ``device``."""
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device)
    return _evaluate(Stage(model), dataset, batch_size, device, precision)


@torch.no_grad()
def _evaluate(stage: Stage, dataset: Dataset, batch_size: int, device: torch.device, precision: str) -> dict:
    model = stage.model
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for inputs, labels in stage.batches(DataLoader(dataset, batch_size=batch_size, shuffle=False), device):
        with autocast(device, precision):
            logits = stage.logits(inputs).float()
        if not torch.isfinite(logits).all():
            model.train(was_training)
            raise NonFiniteOutput(
                "the model's outputs are NaN or infinite: its trained tensors are damaged or training diverged"
            )
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        count += labels.numel()
    model.train(was_training)
    return {"accuracy": correct / max(1, count), "loss": loss_sum / max(1, count), "count": count}


def cache_point(model: TaskModel, train: Dataset, config: TrainConfig) -> int:
    """Where cached training starts (0 = no cache): the model's frozen stretch, if the train split never augments."""
    if config.cache == "off" or getattr(train, "augments", True):
        return 0
    return model.cache_point()


def cache_dataset(model: TaskModel, dataset: Dataset, point: int, config: TrainConfig, device) -> TensorDataset:
    """Run every image once through the frozen stretch before ``point``; keep the outputs (on the CPU). Inside
    :func:`~vptune.trunk_memory.keep_trunk_outputs`, an image whose output an earlier run computed is read back."""
    memory = active_memory()
    keys = None
    if memory is not None:
        keys = image_keys(dataset, (model.backbone.fingerprint(), point, config.precision, str(device)))
    if memory is None or keys is None:
        return TensorDataset(*_trunk_outputs(model, dataset, config, point, device))
    rows = [memory.get(key) for key in keys]
    missing = [index for index, row in enumerate(rows) if row is None]
    if missing:
        computed, _ = _trunk_outputs(model, Subset(dataset, missing), config, point, device)
        memory.keep([keys[index] for index in missing], computed)
        for index, output in zip(missing, computed, strict=True):
            rows[index] = output
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)
    return TensorDataset(torch.stack(rows) if rows else torch.empty(0), labels)


@torch.no_grad()
def _trunk_outputs(
    model: TaskModel, dataset: Dataset, config: TrainConfig, point: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    stage, outputs, labels = Stage(model), [], []
    loader = DataLoader(dataset, batch_size=config.eval_batch_size, shuffle=False)
    model.eval()
    bar = tqdm(loader, desc="caching the frozen trunk", disable=not config.progress, leave=False)
    for images, targets in stage.batches(bar, device):
        with autocast(device, config.precision):
            outputs.append(model.trunk(images, point).float().cpu())
        labels.append(targets.cpu())
    return torch.cat(outputs), torch.cat(labels)


def make_optimizer(model: TaskModel, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW with decoupled weight decay (the released code's AdamW ignored it), over what
    trains; weight decay on every trained tensor but the head's bias, as the released code."""
    bias = model.classifier.bias
    decayed = [p for p in model.parameters() if p.requires_grad and p is not bias]
    groups = [{"params": decayed}, {"params": [bias] if bias.requires_grad else [], "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


@dataclass
class Training:
    """What :func:`vptune.fit` and :func:`vptune.batched.fit_batched` set up alike: the data on its way to the model
    (cached trunk outputs where they apply), the sample order and the schedule's length in steps (``steps`` per
    epoch, ``total`` in all, ``warmup`` of them warming up)."""

    splits: Splits
    stage: Stage
    sampler: DistributedSampler
    loader: Iterable
    device: torch.device
    total: int
    warmup: int
    steps: int

    def shorten(self, epochs: int) -> None:
        """End the schedule after ``epochs`` epochs: the cosine decays to 0 over the new length from the next step."""
        self.total = epochs * self.steps


def prepare(
    model: TaskModel,
    data: str | os.PathLike | TaskData | Splits,
    config: TrainConfig,
    device: torch.device,
    world: int = 1,
    rank: int = 0,
) -> Training:
    """Load the splits, move ``model`` to ``device``, cache its frozen trunk's outputs where that applies, and order
    the samples: the same for any number of processes (rank r of ``world`` takes every w-th of one permutation)."""
    warn_slow_bf16(device, config.precision)
    splits = data if isinstance(data, Splits) else load_splits(data, config, model.preprocessing)
    model.to(device)
    if getattr(model.prompts, "tokens_pending", False):  # init "tokens", "scaled-tokens": from the train split
        init_from_tokens(model, splits.train, seed=config.seed)
    point = cache_point(model, splits.train, config)
    if point:
        cached = [cache_dataset(model, d, point, config, device) if d else None for d in (splits.val, splits.test)]
        splits = Splits(cache_dataset(model, splits.train, point, config, device), *cached)
    order = config.data_seed if config.data_seed is not None else config.seed
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=order)
    loader = train_batches(splits.train, config.batch_size // world, sampler, device)
    steps = epoch_steps(len(loader), config)
    total, warmup = config.epochs * steps, round(config.warmup * steps)
    return Training(splits, Stage(model, point), sampler, loader, device, total, warmup, steps)


def epoch_steps(batches: int, config: TrainConfig) -> int:
    """The steps of one epoch: the split's batches, at most ``config.epoch_steps``."""
    return min(batches, config.epoch_steps) if config.epoch_steps else batches
