"""Frozen backbones: one module per model family, each a :class:`Backbone` subclass registered by name.

Adding a family is adding a module with a subclass that says where its model keeps each part, decorated with
:func:`register_family`, and importing it here.
"""

from . import clip, dinov2, swin, vit  # noqa: F401  (each registers its family)
from .base import IMAGENET_MEAN, IMAGENET_STD, Backbone, drop_tokens, split_range, whole_block
from .clip import CLIP_MEAN, CLIP_STD, ClipBackbone, QuickGelu, quick_gelu
from .dinov2 import Dinov2Backbone
from .loading import (
    FAMILIES,
    SHORT_NAMES,
    load_backbone,
    register_family,
    resolve_spec,
    weight_roots,
    wrap_model,
)
from .swin import SwinBackbone
from .vit import ViTBackbone

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHORT_NAMES",
    "Backbone",
    "ClipBackbone",
    "Dinov2Backbone",
    "QuickGelu",
    "SwinBackbone",
    "ViTBackbone",
    "drop_tokens",
    "load_backbone",
    "quick_gelu",
    "register_family",
    "resolve_spec",
    "split_range",
    "weight_roots",
    "whole_block",
    "wrap_model",
]
