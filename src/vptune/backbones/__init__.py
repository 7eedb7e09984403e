"""Frozen backbones: one module per model family, each a :class:`Backbone` subclass registered by name.

Every family answers one protocol (:class:`Backbone`): the network as embed -> blocks -> features, and how prompts
enter it. Adding a family is adding a module with a subclass that says where its model keeps each part and answers
that protocol (a Transformer's through :class:`TokenBackbone`), decorated with :func:`register_family`, and importing
it here.
"""

from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD
from ..sequence import drop_tokens, split_range
from . import clip, convnet, dinov2, mae, swin, timm_vit, vit  # noqa: F401  (each registers its family)
from .base import Backbone, PromptPass
from .clip import CLIP_MEAN, CLIP_STD, ClipBackbone, QuickGelu, quick_gelu
from .convnet import ConvBackbone, ConvNextBackbone, ResNetBackbone
from .dinov2 import Dinov2Backbone
from .loading import (
    FAMILIES,
    SHORT_NAMES,
    SPEC_LOADERS,
    load_backbone,
    register_family,
    resolve_spec,
    weight_roots,
    wrap_model,
)
from .mae import MaeBackbone
from .mocov3 import convert_mocov3
from .swin import SwinBackbone
from .timm_vit import TimmViTBackbone
from .tokens import TokenBackbone, layout, whole_block
from .vit import ViTBackbone

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MaeBackbone",
    "PromptPass",
    "SHORT_NAMES",
    "SPEC_LOADERS",
    "Backbone",
    "ClipBackbone",
    "ConvBackbone",
    "ConvNextBackbone",
    "Dinov2Backbone",
    "QuickGelu",
    "ResNetBackbone",
    "SwinBackbone",
    "TimmViTBackbone",
    "TokenBackbone",
    "ViTBackbone",
    "convert_mocov3",
    "drop_tokens",
    "layout",
    "load_backbone",
    "quick_gelu",
    "register_family",
    "resolve_spec",
    "split_range",
    "weight_roots",
    "whole_block",
    "wrap_model",
]
