"""Several task models of one prompt structure as one: their prompts (and heads) stacked along the task dimension.

Training K configurations in one pass (:mod:`vptune.batched`) and serving many tasks in one batch
(:class:`vptune.MultiTask`) both run such a stacked model, choosing each sample's prompts and head by task index.
Only the prompts' interface is used (``PromptModule.stacked``, ``copy_row``): any kind of prompt stacks alike.
"""

from __future__ import annotations

import torch
from torch import nn

from .head import Head
from .model import TaskModel


def stackable(model: TaskModel) -> bool:
    """Whether a model's prompts can join a stack (a projection or an input channel is a per-model module)."""
    return model.prompts is None or model.prompts.stackable


def stack(models: list[TaskModel], heads: bool = True) -> TaskModel:
    """One model whose prompts (and, with ``heads``, head) hold the models' tensors, task k = ``models[k]``.

    The models share backbone, prompt structure and input size (and, with ``heads``, their class count). Without
    ``heads`` the stacked model's head is a placeholder: use its features and each model's own head.
    """
    first = models[0]
    prompts = first.prompts.stacked([model.prompts for model in models[1:]]) if first.prompts is not None else None
    head = Head.stacked([model.head for model in models]) if heads else None
    stacked = type(first)(  # TaskModel, or a method's subclass of it (the same signature)
        first.backbone, first.num_classes if heads else 1, first.prompt_config, first.preprocessing,
        method=first.method, prompts=prompts, head=head,
    )  # fmt: skip
    return stacked.to(next(first.parameters()).device)  # the placeholder head too: all on the models' device


@torch.no_grad()
def unstack(stacked: TaskModel, models: list[TaskModel], rows: list[int] | None = None) -> None:
    """Copy task k of a stacked model's prompts and head (its statistics too) back into ``models[k]``, for each k
    of ``rows`` (default: every model)."""
    heads = stacked.head.state_dict()
    for k in range(len(models)) if rows is None else rows:
        model = models[k]
        if model.prompts is not None:
            model.prompts.copy_row(stacked.prompts, k)
        for name, tensor in model.head.state_dict().items():
            tensor.copy_(heads[name][k : k + 1])


class RowTable:
    """Preallocated rows of one module's task tensors (those with a leading task dimension), for tasks that come
    and go: a task's tensors are written into a free row, O(that task), and a dropped row is reused; when every row
    is taken the rows double (amortised O(1) a task, counted in :attr:`grows`). Nothing else is ever restacked.

    Args:
        module: holds the tensors (its rows are replaced by ``capacity`` rows, their values unspecified).
        names: the tensors' dotted names in ``module`` (parameters or buffers).
        capacity: rows to start with.
    """

    def __init__(self, module: nn.Module, names: tuple[str, ...], capacity: int = 16):
        self.module, self.names = module, names
        self.capacity, self.grows = 0, 0
        self._free: list[int] = []
        self._resize(max(1, capacity))

    @property
    def used(self) -> int:
        """Rows holding a task."""
        return self.capacity - len(self._free)

    def put(self, source: nn.Module) -> int:
        """Write a one-task module's tensors (the same names, one row) into a free row; returns the row."""
        if not self._free:
            self._resize(2 * self.capacity)
            self.grows += 1
        row = self._free.pop()
        with torch.no_grad():
            for name in self.names:
                self._tensor(name)[row].copy_(_tensor(source, name)[0])
        return row

    def drop(self, row: int) -> None:
        """Free a row (its values stay until a task is written there)."""
        if row in self._free or not 0 <= row < self.capacity:
            raise KeyError(f"row {row} holds no task")
        self._free.append(row)

    def _tensor(self, name: str) -> torch.Tensor:
        return _tensor(self.module, name)

    def _resize(self, capacity: int) -> None:
        for name in self.names:
            owner, _, leaf = name.rpartition(".")
            holder = self.module.get_submodule(owner)
            old = getattr(holder, leaf)
            new = old.new_empty((capacity, *old.shape[1:]))  # untouched rows take no memory until written
            new[: min(self.capacity, old.shape[0])] = old[: self.capacity].detach()
            if isinstance(old, nn.Parameter):
                setattr(holder, leaf, nn.Parameter(new, requires_grad=False))
            else:
                holder.register_buffer(leaf, new)
        # new rows are free, handed out lowest first
        self._free = sorted(set(self._free) | set(range(self.capacity, capacity)), reverse=True)
        self.capacity = capacity


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner), leaf)
