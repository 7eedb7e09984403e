"""Several task models of one prompt structure as one: their prompts (and heads) stacked along the task dimension.

Training K configurations in one pass (:mod:`vptune.batched`) and serving many tasks in one batch
(:class:`vptune.MultiTask`) both run such a stacked model, choosing each sample's prompts and head by task index.
"""

from __future__ import annotations

import torch

from .head import Head
from .model import TaskModel


def stackable(model: TaskModel) -> bool:
    """Whether a model's prompts can join a stack (a projection or an input channel is a per-model module)."""
    config = model.prompt_config
    return not config.project and config.location not in ("concat-channel", "below")


def stack(models: list[TaskModel], heads: bool = True) -> TaskModel:
    """One model whose prompts (and, with ``heads``, head) hold the models' tensors, task k = ``models[k]``.

    The models share backbone, prompt structure and input size (and, with ``heads``, their class count). Without
    ``heads`` the stacked model's head is a placeholder: use its features and each model's own head.
    """
    first = models[0]
    prompts = None
    if first.prompts is not None:
        embeddings = torch.cat([model.prompts.embeddings.detach() for model in models])
        kind = type(first.prompts)  # Prompts, or a ConvNet's BorderPrompts (the same signature)
        prompts = kind(first.prompt_config, first.backbone, first.image_size, embeddings=embeddings)
        with torch.no_grad():
            for name in _task_tensors(prompts)[1:]:  # key-value prompts: one row per task, as the embeddings
                getattr(prompts, name).copy_(torch.cat([getattr(model.prompts, name) for model in models]))
    head = Head.stacked([model.head for model in models]) if heads else None
    stacked = type(first)(  # TaskModel, or a ConvNet's ConvTaskModel (the same signature)
        first.backbone, first.num_classes if heads else 1, first.prompt_config, first.preprocessing,
        method=first.method, prompts=prompts, head=head,
    )  # fmt: skip
    return stacked.to(next(first.parameters()).device)  # the placeholder head too: all on the models' device


@torch.no_grad()
def unstack(stacked: TaskModel, models: list[TaskModel]) -> None:
    """Copy task k of a stacked model's prompts and head (its statistics too) back into ``models[k]``."""
    rows = stacked.head.state_dict()
    for k, model in enumerate(models):
        if model.prompts is not None:
            for name in _task_tensors(model.prompts):
                getattr(model.prompts, name).copy_(getattr(stacked.prompts, name)[k : k + 1])
        for name, tensor in model.head.state_dict().items():
            tensor.copy_(rows[name][k : k + 1])


def _task_tensors(prompts) -> list[str]:
    """The prompts' tensors with one row per task (a ConvNet's border prompts: the embeddings alone)."""
    return getattr(prompts, "task_tensors", ["embeddings"])
