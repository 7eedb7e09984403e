"""transformers ``ViTMAEModel`` (e.g. facebook/vit-mae-base): the MAE-pretrained ViT, its masking off.

Adapting an MAE encoder uses every patch: the tokens are built here from the patch embedding, the class token and
the fixed sin-cos positions, so ViTMAE's random masking and shuffling never run and a sample's output depends on
nothing but the sample. The read-out is the released code's (MAE's fine-tuning recipe): the mean of every output
but the class token, then ``fc_norm``, a fresh LayerNorm in place of the pretrained final norm.
"""

from __future__ import annotations

import copy

from torch import nn

from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD
from .loading import register_family
from .tokens import layout
from .vit import VIT_ATTENTION, ViTBackbone

FC_NORM_EPS = 1e-6  # the released code's (and MAE's) LayerNorm epsilon


@register_family
class MaeBackbone(ViTBackbone):
    """MAE's encoder: a plain pre-norm ViT whose positions are fixed 2-D sin-cos (the class position is zero).

    The final norm of the model it holds (``model.layernorm``, which MAE pretraining fed to its decoder) is
    ``fc_norm``: a LayerNorm with weight 1 and bias 0, as the released code builds for every MAE transfer (it deletes
    the pretrained norm). The model passed in keeps its own: the backbone holds new modules over the same tensors.
    ``fc_norm`` is applied after pooling (:attr:`pool_before_norm`), stays frozen for VPT, linear and adapters, and
    trains with the methods that train the final norm (full, partial-k, bias), as there.
    """

    family = "mae"
    model_types = ("vit_mae",)
    model_classes = ("ViTMAEModel",)
    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD
    default_readout = "all"  # the released code: mean of prompts and patches, not the class token
    pool_before_norm = True
    load_options = {}
    block_classes = ("ViTMAELayer",)
    block_parts = layout("layernorm_before", "layernorm_after", **VIT_ATTENTION)

    def __init__(self, model: nn.Module, *args, **kwargs):
        shared = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
        model = copy.deepcopy(model, shared)  # new modules over the same tensors: the model passed in keeps its norm
        pretrained = model.layernorm.weight
        model.layernorm = nn.LayerNorm(
            model.config.hidden_size, eps=FC_NORM_EPS, device=pretrained.device, dtype=pretrained.dtype
        )
        super().__init__(model, *args, **kwargs)
