"""Visual Prompt Tuning: VPT-Shallow, VPT-Deep, and VPT-Deep with the backbone's bias terms.

The prompts are the backbone family's (tokens on a Transformer, pixels on a ConvNet): the builders here only choose
how deep they go. The designs beyond the paper are prompt options of VPT-Deep (``kv_tokens``, ``fourier``,
``init``); their combinations are also named recipes (``vpt-deep+kv+fourier`` ...), aliases of those options.
"""

from __future__ import annotations

import itertools

from ..backbones import Backbone
from ..model import TaskModel
from .registry import BuildContext, register, register_alias

# The released configs: prompt dropout 0.1 for deep prompts, none for shallow ones.
DEEP_PROMPT = {"num_tokens": 10, "dropout": 0.1}
SHALLOW_PROMPT = {"num_tokens": 10, "dropout": 0.0}
VPT_DEMO = {"epochs": 4, "warmup_epochs": 1, "base_lr": 0.1}


def prompted_model(context: BuildContext, backbone: Backbone | None = None) -> TaskModel:
    """The context's prompts on ``backbone`` (default the shared one), or on the copy of it that they change
    (``Backbone.prompted_backbone``: e.g. extra input channels through a widened first layer)."""
    backbone = (backbone or context.backbone).prompted_backbone(context.prompt, context.generator)
    return context.model(backbone=backbone)


@register(
    "vpt-shallow", "prompts before the first block (VPT-Shallow; on a ConvNet a border of pixels)",
    prompt=SHALLOW_PROMPT, deep=False, servable=True, batchable=True, perf_rows=("",), demo=VPT_DEMO, demo_rank=1,
    needs=(),
)  # fmt: skip
def _vpt_shallow(context: BuildContext) -> TaskModel:
    return prompted_model(context)


@register(
    "vpt-deep", "fresh prompts before every block (VPT-Deep)", prompt=DEEP_PROMPT, deep=True, servable=True,
    batchable=True, perf_rows=("", "-ckpt", "-ckpt3", "-compiled", "-whole"), demo=VPT_DEMO, demo_rank=2,
)  # fmt: skip
def _vpt_deep(context: BuildContext) -> TaskModel:
    return prompted_model(context)


@register("vpt-deep+bias", "VPT-Deep prompts plus every bias term of the backbone", prompt=DEEP_PROMPT, deep=True)
def _vpt_deep_bias(context: BuildContext) -> TaskModel:
    return prompted_model(context, backbone=bias_backbone(context))


def bias_backbone(context: BuildContext):
    """A copy of the backbone whose bias terms train."""
    return context.backbone.own_copy(lambda name: name.endswith(".bias"))


# Beyond the paper: VPT-Deep with key-value prompts (E2VPT), Fourier prompts (VFPT) and prompts that start as the
# backbone's own tokens (Self-Prompt Tuning), as prompt options; each combination is also a named recipe.
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
            prompt = {key: value for name in names for key, value in DESIGNS[name][0].items()}
            summary = "VPT-Deep with " + "; ".join(DESIGNS[name][1] for name in names)
            register_alias("vpt-deep+" + "+".join(names), "vpt-deep", prompt, summary)


_register_designs()
