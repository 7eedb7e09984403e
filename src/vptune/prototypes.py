"""Prompts that start as the backbone's own tokens (Self-Prompt Tuning, Wang et al., ICML 2024).

With ``PromptConfig(init="tokens")`` each prompted block's p prompts start as p patch tokens that this block receives
when the frozen backbone (no prompts) runs on the training images: drawn uniformly at random, without replacement,
from every (image, patch) pair, as SPT's "random" sampling draws them. :func:`vptune.fit` does it before the first
step, from the split it trains on and with the run's seed; a model whose prompts were loaded or given is left alone.

``init="scaled-tokens"`` draws the same tokens and rescales each to the norm a Xavier-initialised prompt has
(:func:`vptune.prompts.xavier_norm`; 0.89 on ViT-S/14), its direction kept. A pre-norm block sees its prompts only
through LayerNorm, so the rescaling leaves what the starting model computes unchanged (with the ``cls`` read-out)
and changes how far a step turns the prompts: DINOv2's later blocks receive tokens of norm 3 to 9, which SGD barely
turns (docs/benchmarks.md, "Beyond the paper").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .backbones import Backbone
from .model import TaskModel
from .prompts import xavier_norm

BATCH = 64  # images per forward pass while collecting tokens


@torch.no_grad()
def init_from_tokens(model: TaskModel, images: Dataset, seed: int = 0) -> None:
    """Set ``model``'s prompts to patch tokens its prompted blocks receive on ``images`` (SPT's initialisation).

    Args:
        model: a prompted model whose ``PromptConfig.init`` is ``"tokens"`` or ``"scaled-tokens"``.
        images: the training images (a dataset of ``(uint8 image, label)``; its eval views are used, never crops).
        seed: seeds which tokens are drawn: the same seed and images give the same prompts.
    """
    prompts = model.prompts
    if prompts is None or not prompts.config.from_tokens:
        raise ValueError(
            "init_from_tokens needs a prompted model built with PromptConfig(init='tokens') or init='scaled-tokens'"
        )
    if len(images) == 0:
        raise ValueError("init_from_tokens: the training split is empty")
    backbone, num_tokens = model.backbone, prompts.config.num_tokens
    layers = prompts.layers[:1] if prompts.config.shared else prompts.layers
    generator = torch.Generator().manual_seed(seed)
    counts = {layer: tokens.shape[1] for layer, tokens in block_inputs(backbone, _pixels(model, images, [0]), layers)}
    draws = {layer: _draw(len(images), counts[layer], num_tokens, generator) for layer in layers}
    chosen: dict[int, list[torch.Tensor | None]] = {layer: [None] * num_tokens for layer in layers}
    needed = sorted({int(flat) // counts[layer] for layer in layers for flat in draws[layer]})
    for start in range(0, len(needed), BATCH):
        batch = needed[start : start + BATCH]
        row = {image: k for k, image in enumerate(batch)}
        for layer, tokens in block_inputs(backbone, _pixels(model, images, batch), layers):
            for k, flat in enumerate(draws[layer].tolist()):
                image, patch = divmod(flat, counts[layer])
                if image in row:
                    chosen[layer][k] = tokens[row[image], patch]
    for index, layer in enumerate(layers):
        tokens = torch.stack(chosen[layer])  # type: ignore[arg-type]
        if prompts.config.init == "scaled-tokens":
            width = prompts.widths[index]
            norm = xavier_norm(backbone.patch_size, backbone.block_width(0), width)  # the bound _draw uses
            tokens = tokens * (norm / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        prompts.set_tokens(index, tokens)
    prompts.tokens_pending = False


def block_inputs(backbone: Backbone, pixel_values: torch.Tensor, layers: Sequence[int]):
    """``(layer, patch tokens entering that block)`` for each of ``layers`` in order, the frozen backbone without
    prompts; tokens (B, #patches, width), the class and register tokens left out."""
    hidden, wanted = backbone.embed(pixel_values), set(layers)
    for index in range(max(layers) + 1):
        if index in wanted:
            yield index, hidden.flatten(1, -2)[:, backbone.num_prefix_tokens :]  # a grid (Swin) as a sequence
        if index < max(layers):
            hidden = backbone.run_block(index, hidden)


def _draw(images: int, per_image: int, count: int, generator: torch.Generator) -> torch.Tensor:
    if images * per_image < count:
        raise ValueError(
            f"init 'tokens' and 'scaled-tokens' draw {count} prompts from {images} training images x {per_image} "
            "patch tokens: too few tokens; use fewer prompt tokens or more images"
        )
    return torch.randperm(images * per_image, generator=generator)[:count]


def _pixels(model: TaskModel, images: Dataset, indices: list[int]) -> torch.Tensor:
    """Model input for ``images[indices]``: their eval views, normalised, on the model's device."""
    view = getattr(images, "eval_image", None)
    batch = torch.stack([view(i) if view is not None else images[i][0] for i in indices])
    device = next(model.parameters()).device
    if batch.dtype == torch.uint8:
        return model.preprocessing.normalize(batch.to(device))
    return batch.to(device)
