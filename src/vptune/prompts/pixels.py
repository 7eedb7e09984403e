"""Prompts in pixel space, for a backbone without tokens (a ConvNet; the paper's Sec. 4.3, "VPT on ConvNets").

They are learned in the images' own space (values on the 0..1 scale of an image divided by 255) and normalised
exactly as the images are, with the model's preprocessing mean and std, when inserted:

- ``pad`` (:class:`BorderPrompts`): a border of p pixels around the S x S image, so the network sees
  (S+2p) x (S+2p). Two tensors per task, top/bottom (C, 2p, S+2p) and left/right (C, S, 2p): 4Cp(S+p) values
  (12p(S+p) for RGB), the same for every sample of the task; a row per task, so tasks stack.
- ``below`` (:class:`ChannelPrompts`): p extra input channels (S x S each) through a widened first convolution
  whose new kernels start random and which trains whole, on the model's own copy of the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import PromptConfig
from .module import PromptModule


class PixelPrompts(PromptModule):
    """Prompts in the images' own pixel space, learned on the 0..1 scale and normalised as the images are.

    Args:
        config: the prompt configuration (``num_tokens`` = p).
        channels: the image's channels C.
        image_size: the image side S.
        mean, std: the normalisation of the model's images (its preprocessing), applied to the prompts too.
        generator: draws the starting pixels.
    """

    def __init__(
        self,
        config: PromptConfig,
        channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        generator: torch.Generator | None = None,
    ):
        super().__init__(config)
        self.channels, self.image_size = channels, image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.embeddings = nn.Parameter(torch.empty(1, *self.shape()))
        pixel_init(self.embeddings, config.init, generator)

    def shape(self) -> tuple[int, ...]:
        """One task's stored pixels."""
        raise NotImplementedError


class BorderPrompts(PixelPrompts):
    """``pad`` prompts of one or more tasks: ``embeddings`` (T, C*4p(S+p)), each row a task's top/bottom
    (C, 2p, S+2p) then left/right (C, S, 2p) pixels, flattened. As in the released code, the first p rows of
    top/bottom go above the image and the last p below it; the first p columns of left/right go to its left and the
    last p to its right."""

    @property
    def split(self) -> int:
        """Where the top/bottom values end and the left/right ones start."""
        p, s = self.config.num_tokens, self.image_size
        return self.channels * 2 * p * (s + 2 * p)

    def shape(self) -> tuple[int, ...]:
        return (self.split + self.channels * self.image_size * 2 * self.config.num_tokens,)

    def insert(self, pixels: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Normalised images (B, C, S, S) inside their task's border: (B, C, S+2p, S+2p)."""
        check_size(pixels, self.image_size, "pad")
        p, s, c = self.config.num_tokens, self.image_size, self.channels
        rows = self.select_rows(self.embeddings, task_ids)
        top_bottom = normalized(rows[:, : self.split].reshape(-1, c, 2 * p, s + 2 * p), self.mean, self.std)
        left_right = normalized(rows[:, self.split :].reshape(-1, c, s, 2 * p), self.mean, self.std)
        batch = pixels.shape[0]
        top_bottom = top_bottom.to(pixels.dtype).expand(batch, -1, -1, -1)
        left_right = left_right.to(pixels.dtype).expand(batch, -1, -1, -1)
        middle = torch.cat([left_right[..., :p], pixels, left_right[..., p:]], dim=-1)
        return torch.cat([top_bottom[:, :, :p], middle, top_bottom[:, :, p:]], dim=-2)


class ChannelPrompts(PixelPrompts):
    """``below`` prompts: ``embeddings`` (1, p, S, S), p extra input channels, normalised with the mean of the
    preprocessing's channel means and stds (as the released code), appended after the image's channels. The
    widened convolution that reads them is the model's own (``Backbone.prompted_backbone``): they do not stack."""

    def shape(self) -> tuple[int, ...]:
        return (self.config.num_tokens, self.image_size, self.image_size)

    def insert(self, pixels: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised images (B, C, S, S) with the prompt channels after theirs: (B, C+p, S, S)."""
        check_size(pixels, self.image_size, "below")
        mean, std = sum(self.mean) / len(self.mean), sum(self.std) / len(self.std)
        channels = ((self.embeddings - mean) / std).to(pixels.dtype).expand(pixels.shape[0], -1, -1, -1)
        return torch.cat([pixels, channels], dim=1)


def pixel_init(values: torch.Tensor, init: str, generator: torch.Generator | None) -> None:
    """Pixel prompts' start: ``xavier`` (the default) the released code's uniform 0..1, ``normal`` N(0, 1),
    ``zeros`` black; all in pixel space, normalised when inserted."""
    with torch.no_grad():
        if init == "xavier":
            values.uniform_(0.0, 1.0, generator=generator)
        elif init == "normal":
            values.normal_(0.0, 1.0, generator=generator)
        else:
            values.zero_()


def normalized(values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Pixel values (N, C, H, W) on the 0..1 scale, normalised per channel: (values - mean) / std."""
    mean_t = torch.tensor(mean, dtype=values.dtype, device=values.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=values.dtype, device=values.device).view(1, -1, 1, 1)
    return (values - mean_t) / std_t


def check_size(pixels: torch.Tensor, image_size: int, location: str) -> None:
    """Pixel prompts fit one input side: refuse another, saying what to do."""
    size = tuple(pixels.shape[-2:])
    if size != (image_size, image_size):
        raise ValueError(
            f"{location!r} prompts were built for {image_size}x{image_size} input, got {size[0]}x{size[1]}: resize "
            f"the images or rebuild with image_size={size[0]}"
        )
