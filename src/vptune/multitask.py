"""Many tasks, one frozen backbone: mixed-task batches where every sample uses its own task's prompts and head.

Tasks whose prompts have the same structure (length, depth, location, read-out, input size) are stacked into one
prompt tensor with a task dimension and run as one sub-batch; tasks of different structures run as separate
sub-batches of the same call (grouping, not padding: no attention mask is needed, so the backbone's fused
attention stays untouched).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .backbones import Backbone
from .config import to_dict
from .methods import METHODS, get_method
from .model import TaskModel
from .preprocessing import Preprocessing
from .stacking import stack, stackable
from .taskfile import load_task


class MultiTask(nn.Module):
    """One backbone and any number of tasks; ``forward(pixel_values, task_ids)`` -> one logits vector per sample.

    Args:
        backbone: the frozen backbone every task was trained on.
        tasks: loaded task models or task folders; more can be added and removed later.
    """

    def __init__(self, backbone: Backbone, tasks: Iterable[TaskModel | str | os.PathLike] = ()):
        super().__init__()
        self.backbone = backbone
        self.models = nn.ModuleList()
        self._names: list[str] = []
        self._groups: list[_Group] | None = None
        for task in tasks:
            self.add(task)

    def _apply(self, fn, *args, **kwargs):
        self._groups = None  # stacked prompts are rebuilt on the new device / dtype
        return super()._apply(fn, *args, **kwargs)

    @property
    def names(self) -> list[str]:
        """Task names in index order: ``task_ids`` index this list."""
        return list(self._names)

    def add(self, task: TaskModel | str | os.PathLike, name: str | None = None) -> str:
        """Add a task (a loaded model or a task folder); returns its name (default: the folder's name)."""
        if not isinstance(task, TaskModel):
            name = name or Path(task).name
            task = load_task(task, backbone=self.backbone)
        name = name or f"task{len(self._names)}"
        if name in self._names:
            raise ValueError(f"a task named {name!r} is already served: remove it first or pick another name")
        _check_servable(task, self.backbone, name)
        self.models.append(task.eval())
        self._names.append(name)
        self._groups = None
        return name

    def remove(self, name: str) -> None:
        """Stop serving a task."""
        index = self._index(name)
        del self.models[index]
        del self._names[index]
        self._groups = None

    def task(self, name: str) -> TaskModel:
        """The served model of a task."""
        return self.models[self._index(name)]

    def _index(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(f"no task named {name!r}; serving: {', '.join(self._names) or 'none'}")
        return self._names.index(name)

    def preprocessing(self, name: str) -> Preprocessing:
        """How images become a task's input (its task file's preprocessing): use it before :meth:`forward`."""
        return self.task(name).preprocessing

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, task_ids: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """Logits per sample: ``pixel_values`` (B, C, H, W) normalised, ``task_ids`` (B,) indexes :attr:`names`.

        The grouping by task is worked out on the CPU (task ids are few); only the images' device computes.
        """
        ids = torch.as_tensor(task_ids, dtype=torch.long).cpu().reshape(-1)
        if ids.numel() != pixel_values.shape[0]:
            raise ValueError(f"{ids.numel()} task ids for {pixel_values.shape[0]} images: give one per image")
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self._names)):
            raise ValueError(f"task ids must be in 0..{len(self._names) - 1} ({', '.join(self._names)})")
        out: list[torch.Tensor | None] = [None] * ids.numel()
        for group in self.groups():
            rows = torch.isin(ids, group.members).nonzero().flatten()
            if rows.numel():
                logits = group(pixel_values[rows.to(pixel_values.device)], ids[rows])
                for row, values in zip(rows.tolist(), logits, strict=True):
                    out[row] = values
        return out  # type: ignore[return-value]

    def groups(self) -> list[_Group]:
        """Tasks stacked by prompt structure (rebuilt after add/remove)."""
        if self._groups is None:
            by_key: dict[str, list[int]] = {}
            for index, task in enumerate(self.models):
                by_key.setdefault(_structure(task), []).append(index)
            tasks = list(self.models)
            self._groups = [_Group(self.backbone, [tasks[i] for i in idx], idx) for idx in by_key.values()]
        return self._groups


class _Group(nn.Module):
    """Tasks of one prompt structure: their prompts stacked (T, S, n, k), their heads kept per task."""

    def __init__(self, backbone: Backbone, tasks: list[TaskModel], indices: list[int]):
        super().__init__()
        self.members = torch.tensor(indices)
        self.local = {index: position for position, index in enumerate(indices)}
        self.model = tasks[0] if len(tasks) == 1 else stack(tasks, heads=False).requires_grad_(False).eval()
        self.stacked = len(tasks) > 1 and tasks[0].prompts is not None
        self.heads = [task.head for task in tasks]

    def forward(self, pixel_values: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
        """Each sample's logits; ``ids`` (on the CPU) are the samples' task indices in the :class:`MultiTask`."""
        device = pixel_values.device
        local = torch.tensor([self.local[int(i)] for i in ids.tolist()], dtype=torch.long)
        features = self.model.forward_features(pixel_values, local.to(device) if self.stacked else None)
        logits: list[torch.Tensor | None] = [None] * len(local)
        for position, head in enumerate(self.heads):
            rows = (local == position).nonzero().flatten()
            if rows.numel():
                for row, values in zip(rows.tolist(), head(features[rows.to(device)]), strict=True):
                    logits[row] = values
        return logits  # type: ignore[return-value]


def _structure(task: TaskModel) -> str:
    """What must match for tasks to share one stacked prompt tensor."""
    prompt = {k: v for k, v in to_dict(task.prompt_config).items() if k not in ("dropout", "init")}  # not used to serve
    if not stackable(task):
        return f"own:{id(task)}"  # per-task projection / channel kernel: not stackable, a group of its own
    return repr((sorted(prompt.items()), task.image_size))


def _check_servable(task: TaskModel, backbone: Backbone, name: str) -> None:
    if not _servable(task.method) or task.backbone.tuned_parameters:
        servable = ", ".join(name for name, method in METHODS.items() if method.servable)
        raise ValueError(
            f"task {name!r} uses method {task.method!r}, which changes the backbone's weights or computation: "
            f"one shared backbone can serve only {servable}; serve it with its own model"
        )
    ours, theirs = backbone.fingerprint(), task.backbone.fingerprint()
    if ours != theirs:
        raise ValueError(f"task {name!r} was built on backbone {theirs}, this one is {ours}: load it on this backbone")
    if task.prompts is not None and task.prompts.num_tasks != 1:
        raise ValueError(f"task {name!r} already holds {task.prompts.num_tasks} tasks: add single-task models")


def _servable(method: str) -> bool:
    try:
        return get_method(method)[0].servable
    except ValueError:  # built outside the registry
        return False
