"""What every kind of prompt answers, whatever it inserts and where: the one interface of prompt modules."""

from __future__ import annotations

import copy
from typing import ClassVar, Protocol

import torch
from torch import nn

from .config import PromptConfig


class Geometry(Protocol):
    """What prompts read of the backbone they are made for (a :class:`~vptune.Backbone` answers it)."""

    width: int
    depth: int
    patch_size: int
    num_prefix_tokens: int
    in_chans: int

    def block_width(self, index: int) -> int: ...

    def num_patches(self, image_size: int) -> int: ...

    @property
    def patch_embed(self) -> nn.Conv2d: ...


class PromptModule(nn.Module):
    """Prompts of one or more tasks: tokens a Transformer's blocks take in, or pixels around an image.

    Every kind keeps its learned values with a leading task dimension T (1 for one task), so that several tasks'
    prompts stack into one module (:meth:`stacked`) and a batch picks each sample's by task index: the path of
    serving many tasks in one batch and of training several configurations in one pass. Each kind has an ``insert``
    of its own, called by the backbone family that made it (``Backbone.new_prompts``), which knows where it goes.

    Attributes:
        config: the (resolved) prompt configuration.
        task_tensors: the names of the tensors that hold a row per task.
        tokens_pending: the prompts are still to be drawn from the training images (init ``tokens``).
    """

    task_tensors: ClassVar[tuple[str, ...]] = ("embeddings",)
    tokens_pending: bool = False

    def __init__(self, config: PromptConfig):
        super().__init__()
        self.config = config

    @property
    def num_tasks(self) -> int:
        """Tasks T held."""
        return getattr(self, self.task_tensors[0]).shape[0]

    @property
    def entry_block(self) -> int:
        """The first block whose input these prompts change (0: the image or its embedding): everything before it
        runs without them, so its output can be cached."""
        return 0

    @property
    def stackable(self) -> bool:
        """Whether every tensor that trains has a row per task, so that tasks stack (:attr:`PromptConfig.stacks`)."""
        return self.config.stacks

    def stacked(self, others: list[PromptModule]) -> PromptModule:
        """One module holding this one's task rows, then each of ``others``' (of the same structure), in order."""
        if not self.stackable:
            raise ValueError(f"{type(self).__name__} with {self.config.location!r} prompts keeps a module per model")
        modules = [self, *others]
        merged = copy.deepcopy(self)
        for name in self.task_tensors:
            rows = torch.cat([getattr(module, name).detach() for module in modules])
            setattr(merged, name, nn.Parameter(rows))
        return merged

    @torch.no_grad()
    def copy_row(self, stacked: PromptModule, row: int) -> None:
        """Set this (one-task) module's tensors to task ``row`` of ``stacked``."""
        for name in self.task_tensors:
            getattr(self, name).copy_(getattr(stacked, name)[row : row + 1])

    def select_rows(self, tensor: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Each sample's row of a (T, ...) tensor, (B, ...), or the first row (1, ...) when ``task_ids`` is None."""
        return tensor[:1] if task_ids is None else tensor[task_ids]
