"""Trainable pieces the baselines add: adapters, LoRA, a side network, MLP heads, and a private backbone copy.

A method that changes the backbone's weights or computation never touches the backbone it was given
(other tasks share it): it works on :func:`own_backbone`, a structural copy that shares every frozen
tensor and holds its own copy of the tensors that train.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone
from .model import Head


def own_backbone(backbone: Backbone, trains: Callable[[str], bool] = lambda name: False) -> Backbone:
    """A copy of ``backbone`` for one model: frozen tensors shared, tensors named by ``trains`` copied and unfrozen.

    Args:
        backbone: the shared, frozen backbone (left untouched).
        trains: ``trains(name)`` for each ``named_parameters()`` name of the backbone: True = this tensor trains.

    The copy keeps the original's fingerprint: task files record the pretrained weights a task started from.
    """
    backbone.fingerprint()  # cached before copying, so the copy reports the pretrained weights
    chosen = {name for name, _ in backbone.named_parameters() if trains(name)}
    memo = {id(p): p for name, p in backbone.named_parameters() if name not in chosen}
    memo.update({id(b): b for b in backbone.buffers()})
    clone = copy.deepcopy(backbone, memo)
    for name, param in clone.named_parameters():
        param.requires_grad_(name in chosen)
    clone.tuned_parameters = sum(p.numel() for name, p in clone.named_parameters() if name in chosen)
    return clone


class Adapter(nn.Module):
    """Bottleneck ``h + up(relu(down(h)))``, d -> d/r -> d; ``up`` starts at zero, so it starts as the identity.

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
        return hidden + self.up(F.relu(self.down(hidden)))


class AdapterAfter(nn.Module):
    """A frozen linear layer followed by an :class:`Adapter` (placed after a block's MLP output projection)."""

    def __init__(self, linear: nn.Linear, adapter: Adapter):
        super().__init__()
        self.linear = linear
        self.adapter = adapter

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(hidden))


class LoraLinear(nn.Module):
    """``W x + (alpha / rank) * B A x`` over a frozen linear layer; ``B`` starts at zero (Hu et al., 2021)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
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


def set_submodule(root: nn.Module, target: nn.Module, replacement: nn.Module) -> None:
    """Replace the submodule ``target`` of ``root`` (found by identity) with ``replacement``."""
    for name, module in root.named_modules():
        if module is target:
            parent_name, _, attribute = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attribute, replacement)
            return
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


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


class SideNetwork(nn.Module):
    """A small convolutional network on the pixels (side-tuning, Zhang et al. 2020), projected to width d.

    ``depth`` stride-2 3x3 convolutions with ReLU, ``channels`` doubling from ``width`` at each one, global
    average pooling, then a linear projection to the backbone's width.
    """

    def __init__(self, in_chans: int, out_width: int, width: int, depth: int, generator: torch.Generator | None = None):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"side network width and depth must be >= 1, got {width} and {depth}")
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
