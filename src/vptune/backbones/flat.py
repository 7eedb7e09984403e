"""The prompted forward of a flat token sequence ``[prefix, prompts, patches]`` (ViT, DINOv2, CLIP, MAE, timm).

Prompts enter before their block (prepended, added, or, when nothing reads their outputs, as keys and values
alone), key-value prompts join each prompted block's attention, and no block computes an output that nothing
reads: with the ``cls`` read-out the last block computes the class token alone, and VPT-Deep's prompt outputs,
replaced by the next block's, are never computed. The logits and gradients equal those of whole blocks.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..prompts import PromptConfig, Prompts
from ..sequence import drop_tokens
from .base import PromptPass


class TokenBackbone(Protocol):
    """What the flat forward reads of its backbone (:class:`~vptune.backbones.tokens.TokenBackbone` answers it)."""

    depth: int
    num_prefix_tokens: int
    pool_before_norm: bool

    @property
    def norm(self) -> nn.Module: ...

    def run_block(self, index: int, tokens: torch.Tensor, *args) -> torch.Tensor: ...


def flat_features(backbone: TokenBackbone, hidden: torch.Tensor, start: int, run: PromptPass) -> torch.Tensor:
    """Blocks ``start..N-1`` (with prompts), the final norm and the read-out on ``hidden``: features (B, d)."""
    prompts, config, task_ids, skip_unread = run.prompts, run.config, run.task_ids, run.skip_unread
    layers = prompts.layers if prompts is not None else []
    num_prompts = 0
    for index in range(start, backbone.depth):
        prompted = index in layers
        as_context = skip_unread and _is_context(backbone, prompts, config, index, hidden.shape[1], num_prompts)
        cached = run.cache.key_values(backbone, prompts, index, task_ids) if as_context and run.cache else None
        context = None
        if as_context and cached is None:
            context = prompts.tokens(index, task_ids, backbone, hidden.shape[0]).to(hidden.dtype)
        if prompted and not as_context:
            hidden, num_prompts = prompts.insert(index, hidden, num_prompts, task_ids, backbone)
        skip = unread(backbone, config, layers, index, hidden.shape[1], num_prompts) if skip_unread else None
        kv = _joined(cached, prompts.key_values(index, task_ids, hidden.shape[0]) if prompted else None)
        args = (index, hidden, skip, context) + ((kv,) if kv is not None else ())  # a family without kv: its own
        if index < run.recompute and torch.is_grad_enabled():
            hidden = checkpoint(backbone.run_block, *args, use_reentrant=False)
        else:
            hidden = backbone.run_block(*args)
        if skip is not None:
            num_prompts = 0  # the prompts' outputs, never read, were not computed
        elif config.drop_after and layers and index == layers[-1]:
            prefix = backbone.num_prefix_tokens  # (skip_unread off: the prompts' outputs were computed)
            hidden, num_prompts = drop_tokens(hidden, (prefix, prefix + num_prompts)), 0
    return pool(backbone, hidden, config.readout, num_prompts)


def unread(
    backbone: TokenBackbone, config: PromptConfig, layers: list[int], index: int, length: int, num_prompts: int
) -> tuple[int, int] | None:
    """Tokens whose outputs of block ``index`` nothing reads, as a ``(start, stop)`` range, or None.

    With the ``cls`` read-out, the last block's outputs are read for the class token alone; a block's prompt
    outputs are discarded when the next block inserts fresh prompts (VPT-Deep) or when ``drop_after`` removes
    them after the last prompted block.
    """
    prefix = backbone.num_prefix_tokens
    if index == backbone.depth - 1 and config.readout == "cls":
        return (1, length)
    replaced = index + 1 in layers or (config.drop_after and bool(layers) and index == layers[-1])
    return (prefix, prefix + num_prompts) if num_prompts and replaced else None


def _is_context(
    backbone: TokenBackbone, prompts: Prompts | None, config: PromptConfig, index: int, length: int, num_prompts: int
) -> bool:
    """Whether block ``index``'s prompts take part as keys and values alone (nothing reads their outputs) rather
    than being inserted: then the sequence never holds them, with the same logits and gradients."""
    if prompts is None or index not in prompts.layers:
        return False
    prefix = backbone.num_prefix_tokens
    if num_prompts or config.location not in ("prepend", "prepend-pixel"):
        return False
    skipped = unread(backbone, config, prompts.layers, index, length + config.num_tokens, config.num_tokens)
    return skipped is not None and skipped[0] <= prefix < prefix + config.num_tokens <= skipped[1]


def _joined(first: tuple | None, second: tuple | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Two sets of extra keys and values as one (attention does not depend on their order)."""
    if first is None or second is None:
        return first or second
    batch = max(first[0].shape[0], second[0].shape[0])
    keys, values = (
        torch.cat([a.expand(batch, -1, -1), b.to(a.dtype).expand(batch, -1, -1)], dim=1)
        for a, b in zip(first, second, strict=True)
    )
    return keys, values


def read_out(tokens: torch.Tensor, readout: str, num_prefix: int, num_prompts: int) -> torch.Tensor:
    """Pool normalised tokens ``[prefix, prompts, patches]`` into one feature vector per sample."""
    if readout == "cls":
        return tokens[:, 0]
    if readout == "image":
        return tokens[:, num_prefix + num_prompts :].mean(dim=1)
    if readout == "prompt":
        return tokens[:, num_prefix : num_prefix + num_prompts].mean(dim=1)
    return tokens[:, num_prefix:].mean(dim=1)  # "all": prompts and patches, not the class token (the released code)


def pool(backbone: TokenBackbone, hidden: torch.Tensor, readout: str, num_prompts: int) -> torch.Tensor:
    """The final norm and the read-out on the last block's outputs: norm every token then pool, or, for a family
    that pools first (MAE's ``fc_norm``), pool then norm the pooled vector."""
    if backbone.pool_before_norm:
        return backbone.norm(read_out(hidden, readout, backbone.num_prefix_tokens, num_prompts))
    return read_out(backbone.norm(hidden), readout, backbone.num_prefix_tokens, num_prompts)
