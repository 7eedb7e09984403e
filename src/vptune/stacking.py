"""Several task models of one prompt structure as one: their prompts (and heads) stacked along the task dimension.

Training K configurations in one pass (:mod:`vptune.batched`) and serving many tasks in one batch
(:class:`vptune.MultiTask`) both run such a stacked model, choosing each sample's prompts and head by task index.
Only the prompts' interface is used (``PromptModule.stacked``, ``copy_row``): any kind of prompt stacks alike.
"""

from __future__ import annotations

import torch

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
