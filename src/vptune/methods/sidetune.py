"""Side-tuning (Zhang et al. 2020): the frozen backbone's features blended with a small side network's."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_fields, option
from ..model import TaskModel
from .registry import BuildContext, register


@dataclass
class SidetuneOptions:
    """The side network of ``sidetune``."""

    side_width: int = option(16, "sidetune: channels of the side network's first conv (doubling per conv)")
    side_depth: int = option(4, "sidetune: stride-2 convs in the side network")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.side_width < 1 or self.side_depth < 1:
            raise ValueError(f"side_width and side_depth must be >= 1, got {self.side_width} and {self.side_depth}")


@register(
    "sidetune", "frozen backbone blended with a small side network on the pixels", options=SidetuneOptions
)  # fmt: skip
def _sidetune(context: BuildContext) -> TaskModel:
    backbone, options = context.backbone, context.options
    side = SideNetwork(backbone.in_chans, backbone.width, options.side_width, options.side_depth, context.generator)
    return context.model(model_class=SideTuneModel, side=side)


class SideTuneModel(TaskModel):
    """Features ``a * backbone + (1 - a) * side`` with ``a = sigmoid(blend)``, ``blend`` starting at 0 (a = 0.5)."""

    def __init__(self, *args, side: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.side = side
        self.blend = nn.Parameter(torch.zeros(()))

    def forward_features(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        alpha = torch.sigmoid(self.blend)
        return alpha * super().forward_features(pixel_values, task_ids) + (1 - alpha) * self.side(pixel_values)

    def cache_point(self) -> int:
        return 0  # the side network reads the pixels


class SideNetwork(nn.Module):
    """A small convolutional network on the pixels, projected to width d.

    ``depth`` stride-2 3x3 convolutions with ReLU, ``channels`` doubling from ``width`` at each one, global
    average pooling, then a linear projection to the backbone's width.
    """

    def __init__(self, in_chans: int, out_width: int, width: int, depth: int, generator: torch.Generator | None = None):
        super().__init__()
        channels = [in_chans] + [width * 2**i for i in range(depth)]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1) for c_in, c_out in zip(channels, channels[1:], strict=False)
        )
        self.proj = nn.Linear(channels[-1], out_width)
        with torch.no_grad():
            for layer in [*self.convs, self.proj]:
                fan_in = layer.weight[0].numel()
                layer.weight.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
                layer.bias.zero_()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = pixel_values
        for conv in self.convs:
            hidden = F.relu(conv(hidden))
        return self.proj(hidden.mean(dim=(2, 3)))
