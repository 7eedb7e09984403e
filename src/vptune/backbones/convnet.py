"""ConvNet backbones: transformers ``ConvNextModel`` and ``ResNetModel`` (the paper's ConvNeXt-B and ResNet-50).

A ConvNet has no tokens: it is seen as a stem (its first convolution and what follows it up to the first stage), a
list of stages, and a pooling that gives one feature vector per image. VPT prompts it in pixel space (the paper's
Sec. 4.3): a learnable border (``pad``, the default) or extra input channels (``below``), :mod:`vptune.prompts.pixels`;
the token-based methods do not apply to it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..preprocessing import Preprocessing
from ..prompts import CONV_LOCATIONS, BorderPrompts, ChannelPrompts, PromptConfig, PromptModule
from .base import Backbone, PromptPass
from .loading import register_family

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ConvBackbone(Backbone):
    """A frozen ConvNet: ``stem`` -> ``stages`` -> ``pool`` (pooled features of width d).

    ``depth`` counts stages, ``width`` is the pooled features' width, ``blocks`` are the stages (what ``partial-<k>``
    trains the last k of) and ``norm`` is what follows them (ConvNeXt's final LayerNorm; nothing in a ResNet).
    ``patch_size`` is 1: any input side works, the border of a padded input included. Batch norms always use their
    running statistics, which nothing updates (full fine-tuning too): tasks share the backbone and save exactly.
    """

    kind = "a ConvNet"
    capabilities = frozenset()  # no tokens: the token methods are refused (``Method.needs``)
    block_unit = "stages"
    prompt_hint = " (prompts: vpt-shallow with --location pad or below)"
    first_conv: ClassVar[str] = ""  # path of the first convolution in the transformers model

    @classmethod
    def dimensions(cls, config) -> tuple[int, int, int]:
        return int(config.hidden_sizes[-1]), len(config.hidden_sizes), 1

    @classmethod
    def native_size(cls, config) -> int:
        return int(getattr(config, "image_size", 224))

    @property
    def patch_embed(self) -> nn.Conv2d:
        """The first convolution (what "below" prompts widen)."""
        return self.model.get_submodule(self.first_conv)

    @property
    def blocks(self) -> nn.ModuleList:
        """The stages, in order."""
        return self.model.encoder.stages

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The feature map entering the first stage."""
        raise NotImplementedError

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (B, d, h, w) as pooled features (B, d), as the transformers model pools."""
        raise NotImplementedError

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The stem's feature map, entering stage 0."""
        return self.stem(pixel_values)

    def run_block(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Stage ``index`` on a feature map."""
        return self.blocks[index](hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pooled features (B, d) of normalised images."""
        hidden = self.stem(pixel_values)
        for stage in self.blocks:
            hidden = stage(hidden)
        return self.pool(hidden)

    # --- prompting: pixels ----------------------------------------------------------------------------------------
    def resolve_prompt(self, config: PromptConfig) -> PromptConfig:
        """Location ``pad`` where unset and the pooled features as the read-out; a token location, deep prompts or
        prompted layers refused with what to use instead."""
        why = f"a ConvNet ({self.family}) has no tokens"
        if config.enabled and (config.deep or config.layers not in (None, [0])):
            raise ValueError(
                f"deep or per-layer prompts are fresh tokens before Transformer blocks; {why}: use vpt-shallow with "
                "--location pad"
            )
        location = config.location or "pad"
        if config.enabled and location not in CONV_LOCATIONS:
            raise ValueError(
                f"location {location!r} puts prompts among a Transformer's tokens; {why}: use location 'pad' "
                "(--location pad: a learnable border of p pixels) or 'below' (p extra input channels)"
            )
        if config.resolved:
            return config
        return dataclasses.replace(config, location=location, readout=config.readout or "cls")

    def new_prompts(
        self, config: PromptConfig, preprocessing: Preprocessing, generator: torch.Generator | None = None
    ) -> PromptModule | None:
        """A border of pixels (``pad``) or extra input channels (``below``), normalised as ``preprocessing`` says."""
        if not config.enabled:
            return None
        size, mean, std = preprocessing.image_size, preprocessing.mean, preprocessing.std
        if config.location == "pad":
            return BorderPrompts(config, self.in_chans, size, mean, std, generator=generator)
        return ChannelPrompts(config, self.in_chans, size, mean, std, generator=generator)

    def prompted_backbone(self, config: PromptConfig, generator: torch.Generator | None = None) -> Backbone:
        """``below`` prompts: a copy whose first convolution takes the extra channels (:meth:`widen_input`)."""
        if not config.enabled or config.location != "below":
            return self
        copy = self.own_copy(self.trained_names().__contains__)
        copy.widen_input(config.num_tokens, generator)
        return copy

    def prompted_input(self, pixel_values: torch.Tensor, run: PromptPass) -> torch.Tensor:
        """The stem's output for the images with their prompts (a border, or channels)."""
        prompts = run.prompts
        return self.stem(pixel_values if prompts is None else prompts.insert(pixel_values, run.task_ids))

    def prompted_features(self, hidden: torch.Tensor, start: int, run: PromptPass) -> torch.Tensor:
        """Stages ``start..N-1`` on the feature map ``hidden``, then the pooling (the prompts came in with the
        pixels)."""
        for index in range(start, self.depth):
            stage = self.blocks[index]
            if index < run.recompute and torch.is_grad_enabled():
                hidden = checkpoint(stage, hidden, use_reentrant=False)
            else:
                hidden = stage(hidden)
        return self.pool(hidden)

    def widen_input(self, extra: int, generator: torch.Generator | None = None) -> nn.Conv2d:
        """Give the first convolution ``extra`` more input channels (in place: call it on an :meth:`own_copy`).

        The new convolution keeps the pretrained kernels for the image channels; the new kernels are drawn
        Xavier-uniform over the widened convolution's fans (as the released code draws them for ResNet). The whole
        new convolution trains. Returns it.
        """
        old = self.patch_embed
        wide = nn.Conv2d(
            old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
            old.groups, old.bias is not None, old.padding_mode, device=old.weight.device, dtype=old.weight.dtype,
        )  # fmt: skip
        with torch.no_grad():
            nn.init.xavier_uniform_(wide.weight, generator=generator)
            wide.weight[:, : old.in_channels].copy_(old.weight)
            if old.bias is not None:
                wide.bias.copy_(old.bias)
        self.model.set_submodule(self.first_conv, wide)
        self.tuned_parameters = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return wide

    def train(self, mode: bool = True) -> ConvBackbone:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, BATCH_NORMS):
                module.eval()
        return self

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, family={self.family}, width={self.width}, stages={self.depth}"


@register_family
class ConvNextBackbone(ConvBackbone):
    """ConvNeXt: a 4x4 patchify convolution and a LayerNorm, stages (each but the first downsampling first), the
    mean over the last feature map and a final LayerNorm (``ConvNextModel.pooler_output``)."""

    family = "convnext"
    model_types = ("convnext",)
    model_classes = ("ConvNextModel",)
    first_conv = "embeddings.patch_embeddings"

    @property
    def norm(self) -> nn.Module:
        return self.model.layernorm

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        conv = self.patch_embed
        return self.model.embeddings.layernorm(conv(pixel_values.to(conv.weight.dtype)))

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.layernorm(hidden.mean(dim=(-2, -1)))


@register_family
class ResNetBackbone(ConvBackbone):
    """ResNet: a 7x7 stride-2 convolution, batch norm, ReLU and max pooling, stages of residual layers, global
    average pooling (``ResNetModel.pooler_output``, flattened)."""

    family = "resnet"
    model_types = ("resnet",)
    model_classes = ("ResNetModel",)
    first_conv = "embedder.embedder.convolution"

    @property
    def norm(self) -> nn.Module:
        return nn.Identity()  # nothing with parameters follows the last stage

    def stem(self, pixel_values: torch.Tensor) -> torch.Tensor:
        layer, conv = self.model.embedder.embedder, self.patch_embed
        hidden = layer.activation(layer.normalization(conv(pixel_values.to(conv.weight.dtype))))
        return self.model.embedder.pooler(hidden)

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.pooler(hidden).flatten(1)
