"""transformers ``Dinov2Model`` and ``Dinov2WithRegistersModel``: a ViT with LayerScale and optional registers."""

from __future__ import annotations

import torch
from torch import nn

from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD
from .loading import register_family
from .tokens import layout
from .vit import VIT_ATTENTION, ViTBackbone


@register_family
class Dinov2Backbone(ViTBackbone):
    """DINOv2: LayerScale in every block; register tokens (when the model has them) inserted after positions."""

    family = "dinov2"
    model_types = ("dinov2", "dinov2_with_registers")
    model_classes = ("Dinov2Model", "Dinov2WithRegistersModel")
    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD
    load_options = {}
    block_classes = ("Dinov2Layer", "Dinov2WithRegistersLayer")
    block_parts = layout("norm1", "norm2", **VIT_ATTENTION)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_prefix_tokens = 1 + int(getattr(self.model.config, "num_register_tokens", 0))

    @classmethod
    def native_size(cls, config) -> int:
        return 224  # the configs say 518 (the pretraining crop); their preprocessing and every benchmark use 224

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def after_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        registers = getattr(self.model.embeddings, "register_tokens", None)
        if registers is None:
            return tokens
        registers = registers.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
