"""Head-only baselines: a linear head (``linear``) or a k-layer MLP head (``mlp-<k>``) on the frozen backbone."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..head import HEAD_INIT, HEAD_NORM, FeatureNorm, Head
from ..model import TaskModel
from .registry import BuildContext, register

HIDDEN_DROPOUT = 0.1  # the released code's MLP head


@register(
    "linear", "frozen backbone, linear head", head_only=True, servable=True, batchable=True,
    perf_rows=("", "-cached"), demo={"epochs": 5, "warmup_epochs": 1, "base_lr": 0.2}, demo_rank=0, needs=(),
)  # fmt: skip
def _linear(context: BuildContext) -> TaskModel:
    return context.model()


@register(
    "mlp-<k>", "frozen backbone, k-layer MLP head (k-1 hidden layers of width d: ReLU, BatchNorm, Dropout 0.1)",
    head_only=True, needs=(),
)  # fmt: skip
def _mlp(context: BuildContext) -> TaskModel:
    width = context.backbone.width
    head = MlpHead(width, context.num_classes, context.k, context.generator, context.head_init, context.head_norm)
    return context.model(head=head)


class MlpHead(nn.Module):
    """A k-layer MLP head as the released code's: k-1 hidden layers of the backbone's width, each Linear (weight
    kaiming-normal over its fan-out) -> ReLU -> BatchNorm1d -> Dropout(0.1), then a per-task linear :class:`Head`.
    ``norm="batchnorm"`` puts a :class:`FeatureNorm` on the features it reads (as the linear head's)."""

    def __init__(
        self,
        width: int,
        num_classes: int,
        layers: int,
        generator: torch.Generator | None = None,
        init: str = HEAD_INIT,
        norm: str = HEAD_NORM,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"an MLP head needs >= 1 layer, got {layers}")
        self.norm = FeatureNorm(width) if norm == "batchnorm" else None
        self.hidden = nn.ModuleList(_hidden_layer(width, generator) for _ in range(layers - 1))
        self.out = Head(width, num_classes, generator=generator, init=init, norm="none")

    @property
    def num_classes(self) -> int:
        return self.out.num_classes

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm is not None:
            features = self.norm(features, task_ids)
        for layer in self.hidden:
            features = layer(features)
        return self.out(features, task_ids)


def _hidden_layer(width: int, generator: torch.Generator | None) -> nn.Sequential:
    linear = nn.Linear(width, width)
    bound = 1.0 / math.sqrt(width)
    with torch.no_grad():
        nn.init.kaiming_normal_(linear.weight, a=0, mode="fan_out", generator=generator)
        linear.bias.uniform_(-bound, bound, generator=generator)  # nn.Linear's bias, from our generator
    return nn.Sequential(linear, nn.ReLU(), nn.BatchNorm1d(width), nn.Dropout(HIDDEN_DROPOUT))
