"""LoRA (Hu et al. 2021): rank-r updates of a block's attention projections."""

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

ROLES = ("q", "k", "v", "o")


@dataclass
class LoraOptions:
    """The updates of ``lora``."""

    rank: int = option(8, "lora: rank of the update")
    alpha: float = option(8.0, "lora: the update is scaled by alpha / rank")
    lora_targets: str = option("q,v", "lora: attention projections to adapt, from q,k,v,o")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.targets or set(self.targets) - set(ROLES):
            raise ValueError(f"lora_targets must list some of q,k,v,o, got {self.lora_targets!r}")

    @property
    def targets(self) -> list[str]:
        """The projections to adapt, by role."""
        return [target.strip() for target in self.lora_targets.split(",") if target.strip()]


@register(
    "lora", "low-rank updates of attention projections (Hu et al. 2021)", options=LoraOptions, perf_rows=("",)
)  # fmt: skip
def _lora(context: BuildContext) -> TaskModel:
    options, copy = context.options, context.backbone.own_copy()
    for index in range(copy.depth):
        projections = copy.attention_projections(index)
        for role in options.targets:
            lora = LoraLinear(projections[role], options.rank, options.alpha, context.generator)
            replace_submodule(copy.blocks[index], projections[role], lora)
    return context.model(backbone=copy)


class LoraLinear(nn.Module):
    """``W x + (alpha / rank) * B A x`` over a frozen linear layer; ``B`` starts at zero."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        self.linear = linear
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, linear.in_features))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank))
        bound = 1.0 / math.sqrt(linear.in_features)  # kaiming-uniform(a=sqrt(5)), as nn.Linear and LoRA do
        with torch.no_grad():
            self.lora_a.uniform_(-bound, bound, generator=generator)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(hidden, self.lora_a.to(hidden.dtype)), self.lora_b.to(hidden.dtype))
        return self.linear(hidden) + self.scale * update
