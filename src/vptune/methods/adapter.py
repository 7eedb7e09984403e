"""Adapters (Houlsby / Pfeiffer style): a bottleneck MLP with a residual after each block's MLP output."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_fields, option
from ..model import TaskModel
from .registry import BuildContext, register
from .surgery import replace_submodule


@dataclass
class AdapterOptions:
    """The bottleneck of ``adapter``."""

    reduction: int = option(8, "adapter: bottleneck reduction r (d -> d/r -> d)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.reduction < 1:
            raise ValueError(f"adapter reduction must be >= 1, got {self.reduction}")


@register(
    "adapter", "bottleneck adapter after every block's MLP (starts as the identity)", options=AdapterOptions,
    perf_rows=("",),
)  # fmt: skip
def _adapter(context: BuildContext) -> TaskModel:
    copy = context.backbone.own_copy()
    for index in range(copy.depth):
        linear = copy.mlp_output(index)
        adapter = Adapter(linear.out_features, context.options.reduction, context.generator)  # the block's width
        replace_submodule(copy.blocks[index], linear, AdapterAfter(linear, adapter))
    return context.model(backbone=copy)


class Adapter(nn.Module):
    """Bottleneck ``h + up(gelu(down(h)))`` (Pfeiffer, as the released code), d -> d/r -> d; ``up`` starts at zero,
    so it starts as the identity.

    Only the up-projection is zeroed: ``down`` keeps nn.Linear's random init, so ``up`` gets a gradient at the
    first step and ``down`` from the second on (zeroing both, as the released VPT code does, never learns).
    """

    def __init__(self, width: int, reduction: int, generator: torch.Generator | None = None):
        super().__init__()
        if reduction < 1 or width // reduction < 1:
            raise ValueError(f"adapter reduction must be in 1..{width} for width {width}, got {reduction}")
        hidden = width // reduction
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        bound = 1.0 / math.sqrt(width)  # nn.Linear's default range, drawn from our generator
        with torch.no_grad():
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(F.gelu(self.down(hidden)))


class AdapterAfter(nn.Module):
    """A frozen linear layer followed by an :class:`Adapter` (placed after a block's MLP output projection)."""

    def __init__(self, linear: nn.Linear, adapter: Adapter):
        super().__init__()
        self.linear = linear
        self.adapter = adapter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(hidden))
