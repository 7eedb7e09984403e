"""Prompt tokens for a Transformer's blocks: inserted before a block, added to its tokens, given as keys and values
alone (E2VPT), Fourier-transformed (VFPT); pixel prompts turned into tokens by the patch embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..sequence import split_range
from .config import PIXEL_LOCATIONS, PromptConfig, xavier_bound
from .module import Geometry, PromptModule


class Prompts(PromptModule):
    """Learnable prompt tokens for one or more tasks, made by a Transformer family (``Backbone.new_prompts``).

    ``embeddings`` has shape (T, S, n, k): T tasks, S prompt sets (1 when shared, else one per prompted
    layer), n tokens (p for prepend; every token for add; C*s*s pixels per patch for prepend-pixel; H*W for
    concat-channel), k the stored width. On a backbone whose blocks differ in width (Swin) the sets lie side by
    side instead, each at its block's width: (T, 1, n, sum of the widths). T = ``num_tasks`` sets, initialised as
    the paper does; several tasks' trained prompts stack with :meth:`stacked`.
    """

    def __init__(
        self,
        config: PromptConfig,
        backbone: Geometry,
        image_size: int,
        num_tasks: int = 1,
        generator: torch.Generator | None = None,
    ):
        super().__init__(config)
        self.layers = config.prompted_layers(backbone.depth)
        self.widths = _set_widths(config, backbone, self.layers)
        self.side_by_side = any(width != backbone.width for width in self.widths)
        self.image_size = image_size
        self.num_prefix = backbone.num_prefix_tokens
        self.patch_size = backbone.patch_size
        sets = 1 if config.shared or self.side_by_side else len(self.layers)
        self.embeddings = nn.Parameter(torch.empty(num_tasks, sets, *self._shape(backbone)))
        self.proj = nn.Linear(config.project, backbone.width) if config.project else None
        self.dropout = nn.Dropout(config.dropout)
        self.channel_kernel = None
        if config.location == "concat-channel":  # the p extra input channels' kernels of the patch embedding
            kernel_size = config.num_tokens * self.patch_size**2
            self.channel_kernel = nn.Parameter(torch.empty(num_tasks, backbone.width, kernel_size))
        self.kv_keys = self.kv_values = None
        if config.kv_tokens:  # one set per prompted block, at the block's width (side by side on Swin)
            width = sum(self.widths) if self.side_by_side else backbone.width
            kv_shape = (num_tasks, 1 if self.side_by_side else len(self.layers), config.kv_tokens, width)
            self.kv_keys, self.kv_values = (nn.Parameter(torch.empty(kv_shape)) for _ in "kv")
        self.tokens_pending = config.from_tokens  # see vptune.prototypes.init_from_tokens
        self.reset_parameters(backbone, generator)

    @property
    def task_tensors(self) -> tuple[str, ...]:
        """The prompt tokens and, where there are any, the key-value prompts: each with a row per task."""
        return ("embeddings",) + (("kv_keys", "kv_values") if self.kv_keys is not None else ())

    @property
    def entry_block(self) -> int:
        """The first prompted block, or 0 for prompts that enter through the patch embedding."""
        return 0 if self.config.location in PIXEL_LOCATIONS else self.layers[0]

    def _shape(self, backbone: Geometry) -> tuple[int, int]:
        location, width = self.config.location, self.config.project or backbone.width
        if location == "add":
            return backbone.num_prefix_tokens + backbone.num_patches(self.image_size), width
        if location == "prepend-pixel":
            return self.config.num_tokens, backbone.in_chans * self.patch_size**2
        if location == "concat-channel":
            return self.config.num_tokens, self.image_size**2
        return self.config.num_tokens, sum(self.widths) if self.side_by_side else width

    def reset_parameters(self, backbone: Geometry, generator: torch.Generator | None = None) -> None:
        """Initialise as the paper does (``init``), the projection as the released code does."""
        with torch.no_grad():
            # the first block's width: the width of ViT; Swin's first stage's for every stage (the released code)
            self._draw(self.embeddings, self.config.project or backbone.block_width(0), backbone, generator)
            if self.proj is not None:  # as the released code: kaiming fan_out, nn.Linear's bias
                nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out", generator=generator)
                bound = 1.0 / math.sqrt(self.proj.in_features)
                self.proj.bias.uniform_(-bound, bound, generator=generator)
            if self.channel_kernel is not None:  # new kernels, drawn as the released code draws the channels
                bound = xavier_bound(backbone.patch_size, backbone.width)
                self.channel_kernel.uniform_(-bound, bound, generator=generator)
            for tensor in (self.kv_keys, self.kv_values):  # drawn last: without them, the same draws as before
                if tensor is not None:
                    self._draw(tensor, backbone.block_width(0), backbone, generator)

    def _draw(self, tensor: torch.Tensor, width: int, backbone: Geometry, generator: torch.Generator | None) -> None:
        """Fill ``tensor`` as ``init`` says, xavier's bound for ``width`` (``tokens`` and ``scaled-tokens``: as
        ``xavier`` until :func:`init_from_tokens` replaces the prompts, once it sees training images)."""
        if self.config.init == "xavier" or self.config.from_tokens:
            bound = xavier_bound(backbone.patch_size, width)
            tensor.uniform_(-bound, bound, generator=generator)
        elif self.config.init == "normal":
            tensor.normal_(0.0, 0.02, generator=generator)
        else:
            tensor.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "embeddings" in state_dict:  # trained (or given) prompts: no token initialisation is due
            self.tokens_pending = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def select(self, layer: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        """The prompt tokens for ``layer``: (B, n, k) per sample, or (1, n, k) broadcast when task_ids is None."""
        return self._pick(self.embeddings, 0 if self.config.shared else self.layers.index(layer), task_ids)

    def _pick(self, stored: torch.Tensor, index: int, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Set ``index`` of a (T, S, n, k) tensor, (1 or B, n, k); side by side: its slice of the width."""
        if self.side_by_side:
            start = sum(self.widths[:index])
            stored = stored[:, 0, :, start : start + self.widths[index]]
        else:
            stored = stored[:, index]
        return self.select_rows(stored, task_ids)

    def key_values(
        self, layer: int, task_ids: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Block ``layer``'s key-value prompts, ((1 or B, m, d), (1 or B, m, d)), or None when there are none.
        While training with prompt dropout, each sample draws its own masks."""
        if self.kv_keys is None or layer not in self.layers:
            return None
        index = self.layers.index(layer)
        pair = [self._pick(tensor, index, task_ids) for tensor in (self.kv_keys, self.kv_values)]
        if self.training and self.dropout.p > 0:
            pair = [self.dropout(tensor.expand(batch, -1, -1)) for tensor in pair]
        return pair[0], pair[1]

    def tokens(self, layer: int, task_ids: torch.Tensor | None, backbone: Geometry, batch: int) -> torch.Tensor:
        """Prompt tokens at model width for ``layer``, projected, (1 or B, n, d). While training with prompt dropout,
        (B, n, d): every sample draws its own mask, as the released code does (pixel prompts have no dropout)."""
        tokens = self.select(layer, task_ids)
        if self.config.location == "prepend-pixel":
            conv = backbone.patch_embed
            patches = tokens.reshape(-1, conv.in_channels, self.patch_size, self.patch_size)
            return conv(patches.to(conv.weight.dtype)).flatten(1).reshape(tokens.shape[0], tokens.shape[1], -1)
        if self.proj is not None:
            tokens = self.proj(tokens)
        if self.training and self.dropout.p > 0:
            tokens = self.dropout(tokens.expand(batch, -1, -1))
        return fourier(tokens, self.config.fourier_tokens)

    def patch_delta(self, task_ids: torch.Tensor | None, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """concat-channel: what the p extra input channels add to each patch token, (1 or B, #patches, d)."""
        if self.config.location != "concat-channel":
            return None
        self._check_size(pixel_values)
        channels = self.select(0, task_ids).reshape(-1, self.config.num_tokens, self.image_size, self.image_size)
        kernel = self.channel_kernel if task_ids is None else self.channel_kernel[task_ids]  # (T or B, d, p*s*s)
        patches = F.unfold(channels.to(pixel_values.dtype), self.patch_size, stride=self.patch_size)
        return torch.einsum("bkn,bdk->bnd", patches, kernel[: patches.shape[0]].to(patches.dtype))

    def _check_size(self, pixel_values: torch.Tensor) -> None:
        size = tuple(pixel_values.shape[-2:])
        if size != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.config.location!r} prompts were built for {self.image_size}x{self.image_size} input, "
                f"got {size[0]}x{size[1]}: resize the images or rebuild with image_size={size[0]}"
            )

    def insert(
        self,
        layer: int,
        hidden: torch.Tensor,
        num_prompts: int,
        task_ids: torch.Tensor | None,
        backbone: Geometry,
    ) -> tuple[torch.Tensor, int]:
        """Insert (or replace, or add) this layer's prompts; return the new sequence and its prompt count."""
        if self.config.location == "concat-channel":
            return hidden, num_prompts
        tokens = self.tokens(layer, task_ids, backbone, hidden.shape[0]).to(hidden.dtype)
        if self.config.location == "add":
            if tokens.shape[1] != hidden.shape[1]:
                raise ValueError(
                    f"'add' prompts cover {tokens.shape[1]} tokens but the sequence has {hidden.shape[1]}: "
                    f"use {self.image_size}x{self.image_size} input"
                )
            return hidden + tokens, num_prompts
        tokens = tokens.expand(hidden.shape[0], -1, -1)
        prefix_tokens, _, patch_tokens = split_range(hidden, self.num_prefix, self.num_prefix + num_prompts)
        return torch.cat([prefix_tokens, tokens, patch_tokens], dim=1), tokens.shape[1]

    @torch.no_grad()
    def set_tokens(self, index: int, tokens: torch.Tensor) -> None:
        """Prompt set ``index`` of every task row := ``tokens`` (p, its width): token-initialised prompts."""
        if self.side_by_side:
            start = sum(self.widths[:index])
            self.embeddings[:, 0, :, start : start + tokens.shape[-1]] = tokens.to(self.embeddings.dtype)
        else:
            self.embeddings[:, index] = tokens.to(self.embeddings.dtype)


def _set_widths(config: PromptConfig, backbone: Geometry, layers: list[int]) -> list[int]:
    """The width of each stored prompt set: its block's (one set when shared, which needs one width)."""
    widths = [backbone.block_width(layer) for layer in layers]
    if config.shared and len(set(widths)) > 1:
        raise ValueError(
            f"PromptConfig: shared prompts need blocks of one width, but blocks {layers} have widths {widths}: "
            "prompt blocks of one stage, or leave shared off"
        )
    return widths[:1] if config.shared else widths


def fourier(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """VFPT's Fourier prompts: the first ``count`` tokens of (.., n, d) replaced by the real part of their 2-D FFT
    over tokens x width (``Re(FFT_tokens(FFT_width(P)))``), the rest unchanged; computed in float32."""
    if not count:
        return tokens
    transformed = torch.fft.fft2(tokens[..., :count, :].float(), dim=(-2, -1)).real.to(tokens.dtype)
    return transformed if count == tokens.shape[-2] else torch.cat([transformed, tokens[..., count:, :]], dim=-2)
