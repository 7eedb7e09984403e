"""Baselines that train pretrained weights, each on its own copy of the backbone: ``full``, ``partial-<k>``,
``bias`` (BitFit)."""

from __future__ import annotations

from ..model import TaskModel
from .registry import ADAMW_LR_GRID, BuildContext, register
from .vpt import bias_backbone


@register(
    "full", "every backbone weight trains (AdamW)", optimizer="adamw", base_lr=0.0005, lr_grid=ADAMW_LR_GRID,
    perf_rows=("",), needs=(),
)  # fmt: skip
def _full(context: BuildContext) -> TaskModel:
    # DINOv2's mask token serves masked pretraining only: no forward pass uses it, so it stays frozen. The model's
    # own dropout runs while it trains, as the released code's end-to-end training
    trains = lambda name: not name.endswith("mask_token")  # noqa: E731
    return context.model(backbone=context.backbone.own_copy(trains, dropout=True))


@register("partial-<k>", "the last k blocks (a ConvNet's: stages) and the final norm train", needs=())
def _partial(context: BuildContext) -> TaskModel:
    backbone, k = context.backbone, context.k
    if k > backbone.depth:
        raise ValueError(f"partial-{k}: the backbone has only {backbone.depth} {backbone.block_unit}")
    names = set().union(*(backbone.names_of(backbone.blocks[i]) for i in range(backbone.depth - k, backbone.depth)))
    names |= backbone.names_of(backbone.norm)
    return context.model(backbone=backbone.own_copy(names.__contains__))


@register("bias", "only the backbone's bias terms (and the head) train (BitFit)", perf_rows=("",), needs=())
def _bias(context: BuildContext) -> TaskModel:
    return context.model(backbone=bias_backbone(context))
