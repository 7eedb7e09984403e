"""VPT on a ConvNet (VPT.md, "Backbone families"): prompts in pixel space, and the task model that runs them.

A ConvNet has no tokens, so its prompts are pixels, learned in the images' own space (values on the 0..1 scale of
an image divided by 255) and normalised exactly as the images are, by the model's preprocessing, when applied:

- ``pad`` (the default): a border of p pixels around the S x S image, so the network sees (S+2p) x (S+2p). Two
  tensors per task, top/bottom (C, 2p, S+2p) and left/right (C, S, 2p): 4Cp(S+p) values (12p(S+p) for RGB), the
  same for every sample of the task. Servable: the frozen backbone is shared.
- ``below``: p extra input channels (S x S each) through a widened first convolution whose new kernels start
  random and which trains whole, on the method's own copy of the backbone.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbones import Backbone, ConvBackbone
from .model import TaskModel
from .preprocessing import Preprocessing
from .prompts import CONV_LOCATIONS, DefaultLocation, PromptConfig


def conv_prompt(prompt: PromptConfig, backbone: Backbone) -> PromptConfig:
    """``prompt`` for a ConvNet: the default location becomes ``pad``; a token location, deep prompts or prompted
    layers are refused with what to use instead."""
    why = f"a ConvNet ({backbone.family}) has no tokens"
    if prompt.enabled and (prompt.deep or prompt.layers not in (None, [0])):
        raise ValueError(
            f"deep or per-layer prompts are fresh tokens before Transformer blocks; {why}: use vpt-shallow with "
            "--location pad"
        )
    if isinstance(prompt.location, DefaultLocation):
        prompt = dataclasses.replace(prompt, location="pad")
    if prompt.enabled and prompt.location not in CONV_LOCATIONS:
        raise ValueError(
            f"location {prompt.location!r} puts prompts among a Transformer's tokens; {why}: use location 'pad' "
            "(--location pad: a learnable border of p pixels) or 'below' (p extra input channels)"
        )
    return prompt


class BorderPrompts(nn.Module):
    """``pad`` prompts of one or more tasks: ``embeddings`` (T, C*4p(S+p)), each row a task's top/bottom
    (C, 2p, S+2p) then left/right (C, S, 2p) pixels, flattened. As in the released code, the first p rows of
    top/bottom go above the image and the last p below it; the first p columns of left/right go to its left and the
    last p to its right.

    The signature is that of :class:`~vptune.prompts.Prompts`, so that tasks stack (``embeddings`` given: those
    values, T tasks).
    """

    def __init__(
        self,
        config: PromptConfig,
        backbone: Backbone,
        image_size: int,
        num_tasks: int = 1,
        generator: torch.Generator | None = None,
        embeddings: torch.Tensor | None = None,
    ):
        super().__init__()
        self.config, self.image_size, self.channels = config, image_size, backbone.in_chans
        p, s = config.num_tokens, image_size
        self.split = self.channels * 2 * p * (s + 2 * p)  # top/bottom values; left/right follow
        size = self.split + self.channels * s * 2 * p
        given = embeddings is not None
        self.embeddings = nn.Parameter(embeddings.detach().clone() if given else torch.empty(num_tasks, size))
        if not given:
            pixel_init(self.embeddings, config.init, generator)

    @property
    def num_tasks(self) -> int:
        return self.embeddings.shape[0]

    def apply(self, pixels: torch.Tensor, task_ids: torch.Tensor | None, prep: Preprocessing) -> torch.Tensor:
        """Normalised images (B, C, S, S) inside their task's border, normalised as ``prep`` normalises images:
        (B, C, S+2p, S+2p)."""
        check_size(pixels, self.image_size, "pad")
        p, s, c = self.config.num_tokens, self.image_size, self.channels
        rows = self.embeddings[:1] if task_ids is None else self.embeddings[task_ids]
        top_bottom = normalized(rows[:, : self.split].reshape(-1, c, 2 * p, s + 2 * p), prep).to(pixels.dtype)
        left_right = normalized(rows[:, self.split :].reshape(-1, c, s, 2 * p), prep).to(pixels.dtype)
        batch = pixels.shape[0]
        top_bottom, left_right = top_bottom.expand(batch, -1, -1, -1), left_right.expand(batch, -1, -1, -1)
        middle = torch.cat([left_right[..., :p], pixels, left_right[..., p:]], dim=-1)
        return torch.cat([top_bottom[:, :, :p], middle, top_bottom[:, :, p:]], dim=-2)


class ChannelPrompts(nn.Module):
    """``below`` prompts: ``embeddings`` (1, p, S, S), p extra input channels, normalised with the mean of the
    preprocessing's channel means and stds (as the released code), appended after the image's channels."""

    def __init__(self, config: PromptConfig, image_size: int, generator: torch.Generator | None = None):
        super().__init__()
        self.config, self.image_size = config, image_size
        self.embeddings = nn.Parameter(torch.empty(1, config.num_tokens, image_size, image_size))
        pixel_init(self.embeddings, config.init, generator)

    @property
    def num_tasks(self) -> int:
        return 1

    def apply(self, pixels: torch.Tensor, task_ids: torch.Tensor | None, prep: Preprocessing) -> torch.Tensor:
        """Normalised images (B, C, S, S) with the prompt channels after theirs: (B, C+p, S, S)."""
        check_size(pixels, self.image_size, "below")
        mean, std = sum(prep.mean) / len(prep.mean), sum(prep.std) / len(prep.std)
        channels = ((self.embeddings - mean) / std).to(pixels.dtype).expand(pixels.shape[0], -1, -1, -1)
        return torch.cat([pixels, channels], dim=1)


def pixel_init(values: torch.Tensor, init: str, generator: torch.Generator | None) -> None:
    """Pixel prompts' start: ``xavier`` (the default) the released code's uniform 0..1, ``normal`` N(0, 1),
    ``zeros`` black; all in pixel space, normalised when applied."""
    with torch.no_grad():
        if init == "xavier":
            values.uniform_(0.0, 1.0, generator=generator)
        elif init == "normal":
            values.normal_(0.0, 1.0, generator=generator)
        else:
            values.zero_()


def normalized(values: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Pixel values (N, C, H, W) on the 0..1 scale, normalised per channel as ``prep`` normalises images."""
    mean = torch.tensor(prep.mean, dtype=values.dtype, device=values.device).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, dtype=values.dtype, device=values.device).view(1, -1, 1, 1)
    return (values - mean) / std


def check_size(pixels: torch.Tensor, image_size: int, location: str) -> None:
    size = tuple(pixels.shape[-2:])
    if size != (image_size, image_size):
        raise ValueError(
            f"{location!r} prompts were built for {image_size}x{image_size} input, got {size[0]}x{size[1]}: resize "
            f"the images or rebuild with image_size={size[0]}"
        )


class ConvTaskModel(TaskModel):
    """One task's model on a ConvNet: pixel prompts (optional), stem, stages, pooled features, head.

    Takes the arguments of :class:`~vptune.TaskModel`; ``prompt`` is resolved by :func:`conv_prompt` (its default
    location is ``pad``). ``task_ids`` choose each sample's border and head when they hold several tasks.
    ``recomputing(k)`` checkpoints the first k stages.
    """

    def __init__(
        self,
        backbone: ConvBackbone,
        num_classes: int,
        prompt: PromptConfig,
        preprocessing: Preprocessing | int,
        *,
        prompts: nn.Module | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        if isinstance(preprocessing, int):
            preprocessing = Preprocessing(preprocessing, backbone.mean, backbone.std)
        prompt = conv_prompt(prompt, backbone)
        if prompts is None and prompt.enabled:
            size = preprocessing.image_size
            if prompt.location == "pad":
                prompts = BorderPrompts(prompt, backbone, size, generator=generator)
            else:
                prompts = ChannelPrompts(prompt, size, generator=generator)
        super().__init__(backbone, num_classes, prompt, preprocessing, prompts=prompts, generator=generator, **kwargs)

    def prompted(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What the first convolution sees: the normalised images with their prompts (a border, or channels)."""
        if self.prompts is None:
            return pixel_values
        return self.prompts.apply(pixel_values, task_ids, self.preprocessing)

    def forward_features(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features (B, d)."""
        return self.features_from(self.backbone.stem(self.prompted(pixel_values, task_ids)), 0, task_ids)

    def features_from(self, hidden: torch.Tensor, start: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run stages ``start..N-1`` on the feature map ``hidden``, then pool."""
        for index in range(start, self.backbone.depth):
            stage = self.backbone.blocks[index]
            if index < self._recompute and torch.is_grad_enabled():
                hidden = checkpoint(stage, hidden, use_reentrant=False)
            else:
                hidden = stage(hidden)
        return self.backbone.pool(hidden)

    def cache_point(self) -> int:
        """0 (pixels: prompts or the stem train), i in 1..N (the feature map entering stage i, the first that
        trains), N (the last feature map: only the final norm trains) or N + 1 (pooled features: the head only)."""
        backbone = self.backbone
        trains = [any(p.requires_grad for p in stage.parameters()) for stage in backbone.blocks]
        point = trains.index(True) if True in trains else backbone.depth + 1
        if any(p.requires_grad for p in backbone.norm.parameters()):
            point = min(point, backbone.depth)
        inside = {id(p) for p in backbone.blocks.parameters()} | {id(p) for p in backbone.norm.parameters()}
        if self.prompts is not None or any(p.requires_grad for p in backbone.parameters() if id(p) not in inside):
            point = 0
        return point

    @torch.no_grad()
    def trunk(self, pixel_values: torch.Tensor, point: int) -> torch.Tensor:
        """The frozen stretch's output at ``point`` (:meth:`cache_point`); point 0: the pixels themselves."""
        if point == 0:
            return pixel_values
        backbone = self.backbone
        hidden = backbone.stem(pixel_values)
        for stage in list(backbone.blocks)[: min(point, backbone.depth)]:
            hidden = stage(hidden)
        return hidden if point <= backbone.depth else backbone.pool(hidden)
