"""transformers ``CLIPVisionModel`` (and the vision tower of a whole ``CLIPModel`` checkpoint)."""

from __future__ import annotations

import torch
from torch import nn

from .loading import register_family
from .tokens import TokenBackbone, layout

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@register_family
class ClipBackbone(TokenBackbone):
    """CLIP's vision tower: a pre-norm before block 1; the post-norm serves as the final norm.

    The MLPs' quick GELU becomes :class:`QuickGelu`: the same values, half the activations kept for the backward.
    """

    family = "clip"
    model_types = ("clip", "clip_vision_model")
    model_classes = ("CLIPVisionModel",)
    default_mean = CLIP_MEAN
    default_std = CLIP_STD
    block_classes = ("CLIPEncoderLayer",)
    block_parts = layout(
        "layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.blocks:
            if type(block.mlp.activation_fn).__name__ == "QuickGELUActivation":
                block.mlp.activation_fn = QuickGelu()

    @classmethod
    def load_model(cls, source: str, dtype: torch.dtype) -> nn.Module:
        from transformers import CLIPVisionModel

        return CLIPVisionModel.from_pretrained(source, dtype=dtype)

    @property
    def patch_embed(self) -> nn.Conv2d:
        return self.model.embeddings.patch_embedding

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layers

    @property
    def norm(self) -> nn.Module:
        return self.model.post_layernorm

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        return self.model.embeddings.class_embedding.expand(batch, 1, -1)

    def positions(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.model.embeddings.interpolate_pos_encoding(tokens, height, width)

    def after_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.pre_layrnorm(tokens)


def quick_gelu(states: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` (CLIP's activation), keeping only ``x`` for the backward, where autograd keeps
    ``x`` and the sigmoid: in a frozen block that input is the largest tensor kept."""
    return _QuickGelu.apply(states)


class QuickGelu(nn.Module):
    """CLIP's activation as a module: transformers' ``QuickGELUActivation``, keeping half as much for the backward."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return quick_gelu(states)


class _QuickGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(states)
        return states * torch.sigmoid(1.702 * states)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (states,) = ctx.saved_tensors
        gate = torch.sigmoid(1.702 * states)
        return grad * gate * (1 + 1.702 * states * (1 - gate))
