"""A tuned model: frozen backbone, optional prompts, a classification head; every method builds one."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone
from .prompts import PromptConfig, Prompts


class Head(nn.Module):
    """A linear classifier per task, ``weight`` (T, C, d) and ``bias`` (T, C), chosen per sample by task index."""

    def __init__(self, width: int, num_classes: int, num_tasks: int = 1, generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(width)  # nn.Linear's default range
        self.weight = nn.Parameter(
            torch.empty(num_tasks, num_classes, width).uniform_(-bound, bound, generator=generator)
        )
        self.bias = nn.Parameter(torch.empty(num_tasks, num_classes).uniform_(-bound, bound, generator=generator))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[1]

    def forward(self, features: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            return F.linear(features, self.weight[0].to(features.dtype), self.bias[0].to(features.dtype))
        weight, bias = self.weight[task_ids].to(features.dtype), self.bias[task_ids].to(features.dtype)
        return torch.einsum("bd,bcd->bc", features, weight) + bias


def read_out(tokens: torch.Tensor, readout: str, num_prefix: int, num_prompts: int) -> torch.Tensor:
    """Pool normalised tokens ``[prefix, prompts, patches]`` into one feature vector per sample."""
    if readout == "cls":
        return tokens[:, 0]
    if readout == "image":
        return tokens[:, num_prefix + num_prompts :].mean(dim=1)
    if readout == "prompt":
        return tokens[:, num_prefix : num_prefix + num_prompts].mean(dim=1)
    return tokens.mean(dim=1)


class TaskModel(nn.Module):
    """One task's model: ``model(pixel_values) -> logits``.

    The backbone is frozen and stays in eval mode; what trains is whatever the method left with
    ``requires_grad`` (prompts and head for VPT). ``task_ids`` (B,) selects each sample's prompts and head
    when the prompts and head hold several tasks.

    Attributes:
        method: the registry name it was built with.
        prompt_config: the prompts' configuration (``num_tokens=0`` when the method has none).
        image_size: the input side it was built for.
        options: method options beyond the prompt config (recorded in task files).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        prompt: PromptConfig,
        image_size: int,
        generator: torch.Generator | None = None,
        options: dict | None = None,
    ):
        super().__init__()
        self.backbone = backbone
        self.method = "custom"  # build() sets the registry name
        self.prompt_config = prompt
        self.image_size = image_size
        self.options = dict(options or {})
        self.prompts = Prompts(prompt, backbone, image_size, generator=generator) if prompt.enabled else None
        self.head = Head(backbone.width, num_classes, generator=generator)
        self.classes: list[str] | None = None
        self.record: dict = {}

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward_features(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features after the final norm, (B, d)."""
        backbone, prompts = self.backbone, self.prompts
        delta = prompts.patch_delta(task_ids, pixel_values) if prompts is not None else None
        hidden = backbone.embed(pixel_values, patch_delta=delta)
        layers = prompts.layers if prompts is not None else []
        num_prompts = 0
        for index in range(backbone.depth):
            if index in layers:
                hidden, num_prompts = prompts.apply(index, hidden, num_prompts, task_ids, backbone)
            hidden = backbone.run_block(index, hidden)
            if self.prompt_config.drop_after and layers and index == layers[-1]:
                hidden = torch.cat(
                    [hidden[:, : backbone.num_prefix_tokens], hidden[:, backbone.num_prefix_tokens + num_prompts :]], 1
                )
                num_prompts = 0
        tokens = backbone.norm(hidden)
        return read_out(tokens, self.prompt_config.readout, backbone.num_prefix_tokens, num_prompts)

    def forward(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.forward_features(pixel_values, task_ids), task_ids)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors that train: what a task file stores."""
        return {name: param.detach() for name, param in self.named_parameters() if param.requires_grad}

    def num_trainable(self) -> int:
        """Trainable parameters (prompts, projection, head, and anything else the method unfroze)."""
        return sum(param.numel() for param in self.parameters() if param.requires_grad)
