"""Visual Prompt Tuning: VPT-Shallow, VPT-Deep, and VPT-Deep with the backbone's bias terms."""

from __future__ import annotations

import dataclasses
import itertools

from ..backbones import ConvBackbone
from ..convnet import conv_prompt
from ..model import TaskModel
from ..prompts import TOKEN_INITS, PromptConfig
from .registry import BuildContext, register

# The released configs: prompt dropout 0.1 for deep prompts, none for shallow ones.
DEEP_PROMPT = {"num_tokens": 10, "dropout": 0.1}
SHALLOW_PROMPT = {"num_tokens": 10, "dropout": 0.0}
VPT_DEMO = {"epochs": 4, "warmup_epochs": 1, "base_lr": 0.1}


def prompted_model(context: BuildContext, deep: bool, backbone=None) -> TaskModel:
    """The asked (or default) prompts, shallow or deep, on ``backbone`` (default the shared one).

    ``concat-channel`` prompts widen the patch embedding, which then trains whole (as the released code does): on
    a copy of the backbone. On a ConvNet (no tokens): :func:`convnet_model`.
    """
    prompt = context.prompt or PromptConfig(**(context.method.prompt or (DEEP_PROMPT if deep else SHALLOW_PROMPT)))
    if not deep and prompt.layers is not None and len(prompt.layers) > 1:
        raise ValueError("vpt-shallow prompts one block: give at most one layer, or use vpt-deep")
    backbone = backbone or context.backbone
    if not backbone.has_tokens:
        return convnet_model(context, prompt, backbone)
    if prompt.location == "concat-channel":
        embedding = backbone.names_of(backbone.patch_embed)
        trained = {name for name, p in backbone.named_parameters() if p.requires_grad}  # e.g. vpt-deep+bias's
        backbone = backbone.own_copy(lambda name: name in embedding or name in trained)
    return context.model(dataclasses.replace(prompt, deep=deep), backbone=backbone)


def convnet_model(context: BuildContext, prompt: PromptConfig, backbone: ConvBackbone) -> TaskModel:
    """VPT on a ConvNet: a border of pixels (``pad``, the default) on the shared backbone, or extra input channels
    (``below``) through a widened first convolution that trains, on a copy of the backbone."""
    prompt = conv_prompt(prompt, backbone)
    if prompt.enabled and prompt.location == "below":
        backbone = backbone.own_copy()
        backbone.widen_input(prompt.num_tokens, context.generator)
    return context.model(prompt, backbone=backbone)


@register(
    "vpt-shallow", "prompts before the first block (VPT-Shallow; on a ConvNet a border of pixels)",
    prompt=SHALLOW_PROMPT, servable=True, batchable=True, perf_rows=("",), demo=VPT_DEMO, demo_rank=1, convnets=True,
)  # fmt: skip
def _vpt_shallow(context: BuildContext) -> TaskModel:
    return prompted_model(context, deep=False)


@register(
    "vpt-deep", "fresh prompts before every block (VPT-Deep)", prompt=DEEP_PROMPT, servable=True, batchable=True,
    perf_rows=("", "-ckpt", "-ckpt3", "-compiled", "-whole"), demo=VPT_DEMO, demo_rank=2,
)  # fmt: skip
def _vpt_deep(context: BuildContext) -> TaskModel:
    return prompted_model(context, deep=True)


# Beyond the paper: VPT-Deep with key-value prompts (E2VPT), Fourier prompts (VFPT) and prompts that start as the
# backbone's own tokens (Self-Prompt Tuning), each alone and in every combination: vpt-deep+kv, vpt-deep+kv+fourier ...
DESIGNS = {
    "kv": ({"kv_tokens": 5}, "key-value prompts (E2VPT): 5 keys and 5 values per block"),
    "fourier": ({"fourier": 0.5}, "Fourier prompts (VFPT): half of each block's prompts through Re(FFT2)"),
    "tokens": ({"init": "tokens"}, "prompts that start as patch tokens of the training images (SPT)"),
    "scaled-tokens": (
        {"init": "scaled-tokens"},
        "prompts that start as patch tokens of the training images, each at a Xavier prompt's norm",
    ),
}


def _register_designs() -> None:
    for size in range(1, len(DESIGNS) + 1):
        for names in itertools.combinations(DESIGNS, size):
            options = [key for name in names for key in DESIGNS[name][0]]
            if len(set(options)) < len(options):  # two designs set one option (tokens, scaled-tokens: init)
                continue
            prompt = dict(DEEP_PROMPT)
            for name in names:
                prompt.update(DESIGNS[name][0])
            summary = "VPT-Deep with " + "; ".join(DESIGNS[name][1] for name in names)
            register(
                "vpt-deep+" + "+".join(names), summary, prompt=prompt, servable=True,
                batchable=prompt.get("init") not in TOKEN_INITS,  # token prompts are drawn as each run starts
            )(_vpt_deep)  # fmt: skip


_register_designs()


@register("vpt-deep+bias", "VPT-Deep prompts plus every bias term of the backbone", prompt=DEEP_PROMPT)
def _vpt_deep_bias(context: BuildContext) -> TaskModel:
    return prompted_model(context, deep=True, backbone=bias_backbone(context))


def bias_backbone(context: BuildContext):
    """A copy of the backbone whose bias terms train."""
    return context.backbone.own_copy(lambda name: name.endswith(".bias"))
