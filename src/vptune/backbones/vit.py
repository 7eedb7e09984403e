"""transformers ``ViTModel`` (e.g. google/vit-base-patch16-224-in21k, the paper's backbone)."""

from __future__ import annotations

import torch
from torch import nn

from .loading import register_family
from .tokens import TokenBackbone, layout

# Shared by the families built like ViT (DINOv2): 5.x names first, 4.x names after.
VIT_ATTENTION = {
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "o": ("attention.o_proj", "attention.output.dense"),
}


@register_family
class ViTBackbone(TokenBackbone):
    """A plain pre-norm ViT: class token, learned positions, final LayerNorm."""

    family = "vit"
    model_types = ("vit",)
    model_classes = ("ViTModel",)
    default_mean = (0.5, 0.5, 0.5)
    default_std = (0.5, 0.5, 0.5)
    load_options = {"add_pooling_layer": False}  # the pooler is unused; a checkpoint without one would init it randomly
    block_classes = ("ViTLayer",)
    block_parts = layout("layernorm_before", "layernorm_after", **VIT_ATTENTION, mlp_out=("mlp.fc2", "output.dense"))

    @property
    def patch_embed(self) -> nn.Conv2d:
        return self.model.embeddings.patch_embeddings.projection

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers if hasattr(self.model, "layers") else self.model.encoder.layer

    @property
    def norm(self) -> nn.Module:
        return self.model.layernorm

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        return self.model.embeddings.cls_token.expand(batch, -1, -1)

    def positions(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.model.embeddings.interpolate_pos_encoding(tokens, height, width)
