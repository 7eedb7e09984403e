"""One training job: a :class:`RunSpec` says what to train, :func:`run` trains it.

``vptune train``, ``vptune demo`` and every run of a sweep go through here. A run folder's ``config.json`` is the
run's spec, resolved (every default filled in), so ``vptune train --config <run>/config.json`` trains it again.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .backbones import Backbone, load_backbone
from .batched import fit_batched
from .config import check_fields, from_dict, to_dict
from .data import TaskData, open_task
from .distributed import is_main
from .engine import METRICS, TrainConfig
from .files import write_json
from .head import HEAD_INIT, HEAD_INITS, HEAD_NORM, HEAD_NORMS
from .loop import fit
from .methods import build, canonical_name, get_method
from .model import TaskModel
from .prompts import PromptConfig
from .taskfile import RECORD, WEIGHTS, mark_partial, save_task

CONFIG = "config.json"
SPLITS_KEY = "splits"  # config.json records what the data gave (layout, sources, carving, sizes); ignored on reading
SECTIONS = {"prompt": PromptConfig, "train": TrainConfig}


@dataclass
class RunSpec:
    """What one run trains, on what, and how.

    Attributes:
        data: a task name (under ``$VPTUNE_DATA``) or a task folder.
        method: a registered method (``vptune.method_names()``); a named recipe (``vpt-deep+kv``) becomes the method
            it stands for, its options written into ``prompt``.
        backbone: a backbone spec (``dinov2-small``, ``hf:<hub id>``, ``hf:<folder>``).
        image_size: the square input side (None: the backbone's native size).
        prompt: the prompt configuration (None: the method's defaults).
        options: the method's options (e.g. ``{"reduction": 8}`` for ``adapter``).
        train: the training configuration.
        head_init: how the head starts: ``uniform`` (nn.Linear's range) or ``released`` (the released code's).
        head_norm: ``batchnorm`` (a batch norm without affine on the features the head reads) or ``none``.
    """

    data: str
    method: str = "vpt-deep"
    backbone: str = "dinov2-small"
    image_size: int | None = None
    prompt: PromptConfig | None = None
    options: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    head_init: str = field(default=HEAD_INIT, metadata={"choices": HEAD_INITS})
    head_norm: str = field(default=HEAD_NORM, metadata={"choices": HEAD_NORMS})

    def __post_init__(self) -> None:
        check_fields(self)
        method, canonical = get_method(self.method)[0], canonical_name(self.method)  # an unknown one fails here
        if canonical != self.method:  # a recipe: recorded as its method and prompt options
            self.prompt = self.prompt or method.prompt_config()
            self.method = canonical
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"RunSpec: image_size must be >= 1, got {self.image_size}")

    def to_dict(self) -> dict:
        """As JSON: ``config.json`` of a run folder, a sweep's run."""
        return {
            "data": self.data,
            "method": self.method,
            "backbone": self.backbone,
            "image_size": self.image_size,
            "prompt": _prompt_dict(self.prompt) if self.prompt is not None else None,
            "options": dict(self.options),
            "train": _train_dict(self.train),
            "head_init": self.head_init,
            "head_norm": self.head_norm,
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "run spec") -> RunSpec:
        """From :meth:`to_dict`'s form, or any layers of it (see :meth:`from_layers`)."""
        return cls.from_layers(data, where=where)

    @classmethod
    def from_layers(cls, *layers: dict, where: str = "run spec") -> RunSpec:
        """Defaults < each layer in turn (e.g. a config file, then command-line flags).

        A layer holds some of :meth:`to_dict`'s keys; ``prompt``, ``train`` and ``options`` merge key by key, and
        the prompt starts from the method's defaults (the released configs).
        """
        merged: dict[str, Any] = {"prompt": {}, "train": {}, "options": {}}
        for layer in layers:
            layer = {key: value for key, value in layer.items() if key != SPLITS_KEY}  # a record, not a setting
            unknown = sorted(set(layer) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown}; the keys are {', '.join(cls.keys())}")
            for key, value in layer.items():
                if key in merged and not isinstance(value or {}, dict):
                    raise ValueError(f"{where}: {key} must be a mapping of options, got {value!r}")
                merged[key] = {**merged[key], **(value or {})} if key in merged else value
        if not merged.get("data"):
            raise ValueError(f"{where}: no task given: name one with data (CLI: --data NAME, e.g. --data eurosat)")
        method = get_method(merged.get("method", cls.method))[0]
        prompt = {**(method.prompt or {"num_tokens": 0}), **merged["prompt"]}
        merged["prompt"] = from_dict(PromptConfig, prompt, where=f"{where}: prompt")
        merged["train"] = from_dict(TrainConfig, merged["train"], where=f"{where}: train")
        return cls(**merged)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class RunResult:
    """What a run gives back: the trained model, its final metrics, and the spec with every default resolved."""

    spec: RunSpec
    model: TaskModel
    task: TaskData
    metrics: dict
    seconds: float

    def summary(self) -> dict:
        """The run's figures as JSON (a sweep's ``runs/<id>.json``)."""
        return {
            "metrics": self.metrics,
            "trainable_parameters": self.model.num_trainable(),
            "backbone_parameters": self.model.backbone.num_parameters(),
            "tuned_parameters": self.model.backbone.tuned_parameters,
            "seconds": round(self.seconds, 2),
            "library": __version__,
            "resolved": self.spec.to_dict(),
        }


def run(
    spec: RunSpec,
    out: str | os.PathLike | None = None,
    *,
    backbone: Backbone | None = None,
    every_epoch: bool = True,
    on_epoch: Callable[[dict], int | None] | None = None,
) -> RunResult:
    """Train one run; with ``out``, write its run folder.

    The folder holds ``config.json`` (the resolved spec), ``metrics.jsonl`` (a line per epoch, a final line with the
    test accuracy) and the task file (``vptune.json``, ``weights.safetensors``). It is written beside its place and
    moved there whole once the run has finished, so it always agrees with itself: a run that diverges or is
    interrupted leaves ``out`` as it was and its files in ``<out>.partial`` (the task file, if an epoch finished
    and ``every_epoch``, marked partial with the epoch its weights come from).

    Args:
        spec: what to train.
        out: the run folder, or None to write nothing.
        backbone: the loaded backbone of ``spec.backbone`` (default: loaded, and kept for the next run).
        every_epoch: save the task after every epoch (in the staging folder), not only at the end.
        on_epoch: called with each epoch's metrics (``epoch``, ``val_accuracy`` ...) after the epoch is saved; an
            exception it raises stops the run there and comes out of ``run`` (a sweep's successive halving); a number of
            epochs it returns ends the run sooner (:func:`vptune.fit`'s ``on_epoch_end``).

    Raises:
        TrainingDiverged: a loss, gradient or trained tensor became NaN or infinite, or the loss passed its limit.
    """
    start = time.perf_counter()
    staging = RunFolder(Path(out)) if out is not None and is_main() else None  # under torchrun only rank 0 writes
    task, model, splits = build_run(spec, backbone)
    config = spec.train.for_method(model.method)
    resolved = dataclasses.replace(spec, image_size=model.image_size, prompt=model.prompt_config, train=config)
    if staging is None:
        metrics = fit(model, task, config, on_epoch_end=on_epoch)
        return RunResult(resolved, model, task, metrics, time.perf_counter() - start)
    write_json(staging.path / CONFIG, {**resolved.to_dict(), SPLITS_KEY: {"data": task.record(), "images": splits}})

    def save(metrics: dict, status: str) -> None:
        save_task(model, staging.path, train_config=to_dict(config), metrics=metrics, data=task, status=status)

    def end_epoch(metrics: dict) -> int | None:
        if every_epoch:
            save(metrics, f"partial: epoch {metrics['epoch']} of {config.epochs}")
        return on_epoch(metrics) if on_epoch is not None else None

    with staging:
        each = end_epoch if every_epoch or on_epoch is not None else None
        metrics = fit(model, task, config, out_dir=staging.path, on_epoch_end=each)
        save(metrics, "complete")
    return RunResult(resolved, model, task, metrics, time.perf_counter() - start)


RUN_FILES = {CONFIG, METRICS, RECORD, WEIGHTS}


class RunFolder:
    """A run folder written in a staging folder beside its place, then moved there whole (``with``): on success it
    replaces ``out``; on failure it becomes ``<out>.partial`` and ``out`` stays as it was."""

    def __init__(self, out: Path):
        if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - RUN_FILES):
            raise FileExistsError(
                f"{out} exists and holds files that are not a run's ({', '.join(sorted(RUN_FILES))}): "
                "choose a new folder for --out"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            _replace(self.path, self.out)
            return
        if (self.path / RECORD).is_file():
            mark_partial(self.path, f"stopped: {kind.__name__}: {error}")
        _replace(self.path, self.out.with_name(self.out.name + ".partial"))


def _replace(source: Path, target: Path) -> None:
    """Put folder ``source`` at ``target``, the old ``target`` (if any) removed only once the new one is in place."""
    if not target.exists():
        os.replace(source, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, trash / target.name)
    os.replace(source, target)
    shutil.rmtree(trash, ignore_errors=True)


def run_batched(specs: list[RunSpec]) -> list[RunResult]:
    """Train runs that differ only in base lr, weight decay, momentum and seed in one pass (no folders written); a
    run that diverged has ``diverged`` among its metrics (and its model the tensors it started with)."""
    start = time.perf_counter()
    built = [build_run(spec) for spec in specs]
    task, models = built[0][0], [model for _, model, _ in built]
    configs = [spec.train.for_method(spec.method) for spec in specs]
    metrics = fit_batched(models, task, configs)
    seconds = (time.perf_counter() - start) / len(specs)
    return [
        RunResult(dataclasses.replace(spec, image_size=model.image_size, train=config), model, task, m, seconds)
        for spec, model, config, m in zip(specs, models, configs, metrics, strict=True)
    ]


def build_run(spec: RunSpec, backbone: Backbone | None = None) -> tuple[TaskData, TaskModel, dict]:
    """The task (its splits checked: every list and folder the run reads, before anything loads) and the model."""
    task = open_task(spec.data)
    splits = task.summary(used_splits(spec.train))
    backbone = backbone or shared_backbone(spec.backbone)
    model = build(
        spec.method, backbone, task.num_classes, spec.prompt, spec.image_size, spec.train.seed,
        classes=task.classes, protocol=task.protocol, head_init=spec.head_init,
        head_norm=spec.head_norm, **spec.options,
    )  # fmt: skip
    return task, model, splits


def _prompt_dict(prompt: PromptConfig) -> dict:
    """A prompt configuration as JSON; a location left to the backbone's family is left out, and so are the designs
    beyond the paper while off (``kv_tokens``, ``fourier``), so that a run is recorded as it was before they existed
    (a sweep resumes its runs)."""
    values = to_dict(prompt)
    for name in ("location", "kv_tokens", "fourier"):
        if not values[name]:
            del values[name]
    return values


def _train_dict(train: TrainConfig) -> dict:
    """A training configuration as JSON; ``epoch_steps`` left out while unset, so that a run is recorded as it was
    before it existed (a sweep resumes its runs)."""
    values = to_dict(train)
    if values["epoch_steps"] is None:
        del values["epoch_steps"]
    return values


def canonical_entry(entry: dict) -> dict:
    """A sweep run's entry (``{"id", "stage", "setting", "run"}``) as a new plan writes it: a method recorded under a
    named recipe's name (before designs were prompt options) becomes the method it stands for; the recipe's options
    are in the recorded prompt already."""
    run = entry.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("method"), str):
        return entry
    try:
        method = canonical_name(run["method"])
    except ValueError:  # a method this vptune does not know: it matches no plan
        return entry
    return {**entry, "run": {**run, "method": method}}


def used_splits(config: TrainConfig) -> tuple[str, ...]:
    """The splits a run with this training configuration reads."""
    return tuple(split for split in (config.train_split, config.val_split, config.test_split) if split)


_BACKBONES: dict[str, Backbone] = {}


def shared_backbone(spec: str) -> Backbone:
    """The backbone of ``spec``, loaded once and kept while the runs that follow use it (one in memory)."""
    if spec not in _BACKBONES:
        _BACKBONES.clear()
        _BACKBONES[spec] = load_backbone(spec)
    return _BACKBONES[spec]
