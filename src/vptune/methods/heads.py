"""Head-only baselines: a linear head (``linear``) or a k-layer MLP head (``mlp-<k>``) on the frozen backbone."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Head, TaskModel
from .registry import BuildContext, register


@register(
    "linear", "frozen backbone, linear head", head_only=True, servable=True, batchable=True,
    perf_rows=("", "-cached"), demo={"epochs": 5, "warmup_epochs": 1, "base_lr": 0.2}, demo_rank=0,
)  # fmt: skip
def _linear(context: BuildContext) -> TaskModel:
    return context.model()


@register("mlp-<k>", "frozen backbone, k-layer MLP head (k-1 hidden layers of width d, ReLU)", head_only=True)
def _mlp(context: BuildContext) -> TaskModel:
    width = context.backbone.width
    return context.model(head=MlpHead(width, context.num_classes, context.k, generator=context.generator))


class MlpHead(nn.Module):
    """A k-layer MLP head: k-1 hidden layers of the backbone's width with ReLU, then a per-task linear :class:`Head`."""

    def __init__(self, width: int, num_classes: int, layers: int, generator: torch.Generator | None = None):
        super().__init__()
        if layers < 1:
            raise ValueError(f"an MLP head needs >= 1 layer, got {layers}")
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers - 1))
        bound = 1.0 / math.sqrt(width)
        with torch.no_grad():
            for linear in self.hidden:
                linear.weight.uniform_(-bound, bound, generator=generator)
                linear.bias.uniform_(-bound, bound, generator=generator)
        self.out = Head(width, num_classes, generator=generator)

    @property
    def num_classes(self) -> int:
        return self.out.num_classes

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        for linear in self.hidden:
            features = F.relu(linear(features))
        return self.out(features, task_ids)
