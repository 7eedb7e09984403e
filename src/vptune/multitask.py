"""Many tasks, one frozen backbone: mixed-task batches where every sample uses its own task's prompts and head.

Tasks whose prompts have the same structure (length, depth, location, read-out, input size) keep their prompts as
rows of one preallocated, growable table (:class:`~vptune.stacking.RowTable`) and run as one sub-batch, each sample
gathering its row; tasks of different structures run as separate sub-batches of the same call (grouping, not
padding: no attention mask is needed, so the backbone's fused attention stays untouched). Heads are rows of one
table per class count, gathered the same way. Adding or dropping a task writes or frees its rows alone.

Given a ``root``, every task folder under it is servable by its path relative to the root and is loaded on its first
use; with ``max_resident`` the least recently used task is dropped beyond that many; a folder that changes on disk
is loaded again (and checked again) on its next use.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backbones import Backbone
from .backbones.context import ContextCache
from .config import to_dict
from .head import Head
from .methods import METHODS, get_method
from .model import TaskModel
from .preprocessing import Preprocessing
from .prompts import PromptConfig
from .stacking import RowTable, stack, stackable
from .taskfile import RECORD, WEIGHTS, load_task

SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
TASK_NAME = re.compile(SEGMENT)
"""A task's name: 1-64 letters, digits, '.', '_' or '-', a letter or digit first."""
TASK_PATH = re.compile(rf"{SEGMENT}(/{SEGMENT}){{0,15}}")
"""A task's name under a task root: its folder's path relative to the root, segments as :data:`TASK_NAME`."""


class TaskNotFound(KeyError):
    """A task that is neither served nor a task folder under the task root."""


@dataclass(frozen=True)
class TaskInfo:
    """What a served task answers with and how its images are prepared (its tensors live in the tables)."""

    name: str
    method: str
    classes: list[str]
    preprocessing: Preprocessing
    prompt_config: PromptConfig

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size


@dataclass
class _Entry:
    info: TaskInfo
    structure: str
    row: int
    head: str
    head_row: int
    stamp: tuple | None  # the task folder's files when loaded from the task root; None: not watched


class MultiTask(nn.Module):
    """One backbone and any number of tasks; ``forward(pixel_values, task_ids)`` (task names or indexes of
    :attr:`names`) -> one logits vector per sample.

    Args:
        backbone: the frozen backbone every task was trained on.
        tasks: loaded task models or task folders; more can be added and removed later.
        root: a folder whose task folders (at any depth) are served on demand, by their relative paths.
        max_resident: most tasks kept loaded (the least recently used dropped beyond); None: no bound.
        kv_cache: task rows per prompt structure whose prompt keys and values are kept (0: computed per batch).
    """

    def __init__(
        self,
        backbone: Backbone,
        tasks: Iterable[TaskModel | str | os.PathLike] = (),
        *,
        root: str | os.PathLike | None = None,
        max_resident: int | None = None,
        kv_cache: int = 256,
    ):
        super().__init__()
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"max_resident must be >= 1 (or None: no bound), got {max_resident}")
        if root is not None and not Path(root).is_dir():
            raise ValueError(f"task root {root} is not a folder")
        self.backbone = backbone
        self.root = Path(root) if root is not None else None
        self.max_resident, self.kv_cache = max_resident, kv_cache
        self.structures: dict[str, _Structure] = {}
        self.heads: dict[str, RowTable] = {}
        self._holders = nn.ModuleList()  # the tables' modules, so that .to() moves them
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._added: dict[str, None] = {}  # the resident tasks in the order they were added
        self._pinned: set[str] = set()
        self.loads = 0  # task folders read: what a test counts
        for task in tasks:
            self.add(task)

    def _apply(self, fn, *args, **kwargs):
        for structure in self.structures.values():
            if structure.cache is not None:
                structure.cache.clear()  # kept keys and values are computed again on the new device / dtype
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> MultiTask:
        """A server never trains: its tables stay in eval mode (the heads' feature statistics fixed)."""
        return super().train(False)

    # --- which tasks ------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Resident tasks in the order they were added: integer task ids index this list."""
        return list(self._added)

    def servable(self) -> list[str]:
        """Every task this server answers: the resident ones and every task folder under the root (listed, not
        read)."""
        listed = set(self._entries)
        if self.root is not None:
            for folder, dirs, files in os.walk(self.root):
                dirs.sort()
                if RECORD in files:
                    name = Path(folder).relative_to(self.root).as_posix()
                    if TASK_PATH.fullmatch(name):
                        listed.add(name)
        return sorted(listed)

    def resident(self) -> list[TaskInfo]:
        """The resident tasks, in the order they were added (nothing is loaded or checked)."""
        return [self._entries[name].info for name in self._added]

    def info(self, name: str) -> TaskInfo:
        """A task's classes, method and preprocessing; a task under the root is loaded (or reloaded if its folder
        changed) first."""
        return self._resident(name, check=True).info

    def add(self, task: TaskModel | str | os.PathLike, name: str | None = None) -> str:
        """Add a task (a loaded model or a task folder); returns its name (default: the folder's name)."""
        if not isinstance(task, TaskModel):
            name = name or Path(task).name
            task = self._read(Path(task))
        name = name or f"task{len(self._added)}"
        if name in self._entries:
            raise ValueError(f"a task named {name!r} is already served: remove it first or pick another name")
        self._put(name, task, stamp=None)
        return name

    def remove(self, name: str) -> None:
        """Stop serving a task (under a root: drop it from memory; its next use loads it again)."""
        if name not in self._entries:
            raise TaskNotFound(f"no task named {name!r}; serving: {', '.join(self.names) or 'none'}")
        entry = self._entries.pop(name)
        self.structures[entry.structure].drop(entry.row)
        self.heads[entry.head].drop(entry.head_row)
        del self._added[name]

    def preprocessing(self, name: str) -> Preprocessing:
        """How images become a task's input (its task file's preprocessing): use it before :meth:`forward`."""
        return self.info(name).preprocessing

    def groups(self) -> list[_Structure]:
        """The prompt structures that hold tasks, each run as one sub-batch."""
        return [structure for structure in self.structures.values() if structure.used]

    # --- the batch --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, task_ids: Sequence[int | str] | torch.Tensor) -> list[torch.Tensor]:
        """Logits per sample: ``pixel_values`` (B, C, H, W) normalised; ``task_ids`` one per image, task names or
        integer ids (indexes of :attr:`names`). A task under the root that is not resident is loaded.

        The grouping by task is worked out on the CPU; only the images' device computes, and a batch's cost depends
        on its samples and its structures, not on how many tasks are served.
        """
        names = self._batch_names(pixel_values, task_ids)
        self._pinned = set(names)  # not dropped while this batch needs them
        try:
            return self._logits(pixel_values, [self._resident(name, check=False) for name in names])
        finally:
            self._pinned = set()
            self._evict()

    def _logits(self, pixel_values: torch.Tensor, entries: list[_Entry]) -> list[torch.Tensor]:
        device = pixel_values.device
        features: torch.Tensor | None = None
        for key, rows in _by(entries, lambda entry: entry.structure).items():
            index = torch.tensor(rows, dtype=torch.long, device=device)
            values = self.structures[key].features(pixel_values[index], [entries[row].row for row in rows])
            if features is None:
                features = values.new_empty((len(entries), values.shape[1]))
            features[index] = values
        out: list[torch.Tensor | None] = [None] * len(entries)
        for key, rows in _by(entries, lambda entry: entry.head).items():
            slots = torch.tensor([entries[row].head_row for row in rows], dtype=torch.long, device=device)
            index = torch.tensor(rows, dtype=torch.long, device=device)
            for row, values in zip(rows, self.heads[key].module(features[index], slots).unbind(), strict=True):
                out[row] = values
        return out  # type: ignore[return-value]

    def _batch_names(self, pixel_values: torch.Tensor, tasks) -> list[str]:
        if isinstance(tasks, torch.Tensor):
            tasks = tasks.cpu().reshape(-1).tolist()
        tasks = list(tasks)
        if len(tasks) != pixel_values.shape[0]:
            raise ValueError(f"{len(tasks)} task ids for {pixel_values.shape[0]} images: give one per image")
        if all(isinstance(task, str) for task in tasks):
            return tasks
        names = self.names
        bad = [task for task in tasks if not isinstance(task, str) and not 0 <= int(task) < len(names)]
        if bad:
            raise ValueError(f"task ids must be in 0..{len(names) - 1} ({', '.join(names)}), got {bad[:5]}")
        return [task if isinstance(task, str) else names[int(task)] for task in tasks]

    # --- residency ----------------------------------------------------------------------------------------------
    def _resident(self, name: str, check: bool) -> _Entry:
        """The task's entry, loaded from the root if it is not resident (or, with ``check``, if its folder
        changed); the most recently used."""
        entry = self._entries.get(name)
        if entry is not None and check and entry.stamp is not None:
            if _stamp(self._folder(name)) != entry.stamp:
                self.remove(name)  # stale: read again, and if the folder is damaged now, not served at all
                entry = None
        if entry is None:
            if self.root is None:
                raise TaskNotFound(f"no task named {name!r}; serving: {', '.join(self.names) or 'none'}")
            folder = self._folder(name)
            stamp = _stamp(folder)
            entry = self._put(name, self._read(folder), stamp)
        self._entries.move_to_end(name)
        return entry

    def _folder(self, name: str) -> Path:
        """The task folder a name stands for under the root (never outside it)."""
        if self.root is None or not TASK_PATH.fullmatch(name) or ".." in name.split("/"):
            raise TaskNotFound(f"no task named {name!r}")
        folder = self.root / name
        if not folder.resolve().is_relative_to(self.root.resolve()) or not (folder / RECORD).is_file():
            raise TaskNotFound(f"no task named {name!r} under the task root {self.root}")
        return folder

    def _read(self, folder: Path) -> TaskModel:
        self.loads += 1
        return load_task(folder, backbone=self.backbone)

    def _put(self, name: str, task: TaskModel, stamp: tuple | None) -> _Entry:
        _check_servable(task, self.backbone, name)
        key, head_key = _structure(task), _head_structure(task)
        if key not in self.structures:
            self.structures[key] = _Structure(task, self.kv_cache)
            self._holders.append(self.structures[key])
        if head_key not in self.heads:
            table = Head.stacked([task.head]).requires_grad_(False).eval()
            self.heads[head_key] = RowTable(table, tuple(table.state_dict()))
            self._holders.append(table)
        row = self.structures[key].put(task)
        head_row = self.heads[head_key].put(task.head)
        info = TaskInfo(name, task.method, list(task.classes), task.preprocessing, task.prompt_config)
        entry = _Entry(info, key, row, head_key, head_row, stamp)
        self._entries[name] = entry
        self._added[name] = None
        self._evict()
        return entry

    def _evict(self) -> None:
        """Drop the least recently used tasks beyond ``max_resident`` (never one the current batch needs)."""
        if self.max_resident is None:
            return
        for name in list(self._entries):
            if len(self._entries) <= self.max_resident:
                break
            if name not in self._pinned:
                self.remove(name)


class _Structure(nn.Module):
    """Tasks of one prompt structure: one model whose prompts hold a row per task (rows of a :class:`RowTable`),
    its prompts' keys and values kept where they enter as keys and values alone; a task whose prompts keep a
    module of their own (not stackable) is a structure of its own."""

    def __init__(self, task: TaskModel, kv_cache: int):
        super().__init__()
        self.own = task.prompts is not None and not stackable(task)
        self.model = task if self.own else stack([task], heads=False).requires_grad_(False).eval()
        stacked = self.model.prompts is not None and not self.own
        self.rows = RowTable(self.model.prompts, self.model.prompts.task_tensors) if stacked else None
        self.cache = ContextCache(kv_cache) if stacked and kv_cache else None
        self.model.context_cache = self.cache
        self.used = 0

    def put(self, task: TaskModel) -> int:
        if self.own and self.used:
            raise RuntimeError("a task with a prompt module of its own has a structure of its own")
        self.used += 1
        if self.rows is None:
            return 0
        row = self.rows.put(task.prompts)
        if self.cache is not None:
            self.cache.forget(row)
        return row

    def drop(self, row: int) -> None:
        self.used -= 1
        if self.rows is not None:
            self.rows.drop(row)

    def features(self, pixel_values: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Features of each sample with its task row's prompts."""
        if self.rows is None:
            return self.model.forward_features(pixel_values)
        if self.cache is not None:
            self.cache.prepare(rows)
        try:
            ids = torch.tensor(rows, dtype=torch.long, device=pixel_values.device)
            return self.model.forward_features(pixel_values, ids)
        finally:
            if self.cache is not None:
                self.cache.done()


def _by(entries: list[_Entry], key) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for row, entry in enumerate(entries):
        groups.setdefault(key(entry), []).append(row)
    return groups


def _stamp(folder: Path) -> tuple:
    """What changes when a task folder is written again: its files' sizes, times and inodes."""
    stats = [os.stat(folder / name) for name in (RECORD, WEIGHTS) if (folder / name).exists()]
    return tuple((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats)


def _structure(task: TaskModel) -> str:
    """What must match for tasks to share one table of prompts."""
    prompt = {k: v for k, v in to_dict(task.prompt_config).items() if k not in ("dropout", "init")}  # not used to serve
    if not stackable(task):
        return f"own:{id(task)}"  # per-task projection / channel kernel: not stackable, a group of its own
    return repr((sorted(prompt.items()), task.image_size))


def _head_structure(task: TaskModel) -> str:
    """What must match for heads to share one table: the class count, width and feature norm."""
    head = task.head
    return repr((tuple(head.weight.shape[1:]), head.norm is not None))


def _check_servable(task: TaskModel, backbone: Backbone, name: str) -> None:
    if not _servable(task.method) or task.backbone.tuned_parameters or not isinstance(task.head, Head):
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
