"""The Transformer families: a frozen ViT seen as a token embedding, pre-norm blocks and a final norm.

Prompts are tokens (:class:`~vptune.prompts.Prompts`): inserted into the sequence ``[prefix, prompts, patches]``
before a block, added to its tokens, or given to its attention as keys and values only; the prompted forward of that
flat sequence is :mod:`.flat`. A family whose blocks cannot run on such a sequence (Swin) overrides
:meth:`TokenBackbone.prompted_features`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..preprocessing import Preprocessing
from ..prompts import CONV_LOCATIONS, PromptConfig, PromptModule, Prompts
from ..sequence import drop_tokens
from .base import Backbone, PromptPass
from .flat import flat_features

Paths = str | tuple[str, ...]


class TokenBackbone(Backbone):
    """A frozen vision Transformer: patch embedding with class (and register) tokens and positions, blocks, norm.

    ``block_classes`` and ``block_parts`` say where the family's own blocks keep each part (see :func:`layout`):
    those blocks compute only the tokens whose outputs are read, take key-value prompts, and are where adapters and
    LoRA go; any other block (another layout, or a module a user put in) runs whole.
    """

    block_classes: ClassVar[tuple[str, ...]] = ()
    # candidate paths by role, newest transformers names first; ``layer_scale1/2`` are used where a block has them
    block_parts: ClassVar[dict[str, tuple[str, ...]]] = {}
    default_readout: ClassVar[str] = "cls"  # the head's input when the prompt config leaves ``readout`` unset
    pool_before_norm: ClassVar[bool] = False  # True: the read-out pools the last block's outputs, then ``norm`` (MAE)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._paths: dict[type, dict[str, str]] = {}

    # --- what each family provides ------------------------------------------------------------------------------
    def prefix_tokens(self, batch: int) -> torch.Tensor:
        """Class token (before positions are added), shape (batch, 1, d)."""
        raise NotImplementedError

    def positions(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings for ``[cls, patches]``, interpolated to the input grid as the family does."""
        raise NotImplementedError

    def after_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Anything the family inserts after positions (registers) or applies before block 1 (CLIP's pre-norm)."""
        return tokens

    # --- the network ------------------------------------------------------------------------------------------
    def embed(self, pixel_values: torch.Tensor, patch_delta: torch.Tensor | None = None) -> torch.Tensor:
        """Embed an image batch into ``[prefix tokens, patch tokens]`` with positions.

        Args:
            pixel_values: normalised images (B, C, H, W); H and W multiples of the patch size.
            patch_delta: optional (1 or B, #patches, d) added to the patch tokens before positions
                (what an extra input channel of the patch embedding contributes).
        """
        height, width = pixel_values.shape[-2:]
        conv = self.patch_embed
        patches = conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        if patch_delta is not None:
            patches = patches + patch_delta
        tokens = torch.cat([self.prefix_tokens(patches.shape[0]).to(patches.dtype), patches], dim=1)
        tokens = tokens + self.positions(tokens, height, width).to(tokens.dtype)
        return self.after_positions(tokens)

    def run_block(
        self,
        index: int,
        tokens: torch.Tensor,
        skip: tuple[int, int] | None = None,
        context: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Apply block ``index`` to a token sequence (no attention mask).

        ``skip = (start, stop)``: the outputs of tokens ``start..stop-1`` are never read, so they are not computed;
        those tokens still serve as keys and values, and the result holds the other tokens, in order.
        ``context`` (1 or B, n, d): tokens that take part in attention as keys and values only, their outputs never
        computed; for a block, which sees no positions, the same as inserting them anywhere in the sequence and
        skipping their outputs (VPT-Deep's prompts, replaced by the next block's, without moving the sequence).
        ``kv`` ((1 or B, m, d), (1 or B, m, d)): key-value prompts, appended to the keys and the values after their
        projections (E2VPT); they need the family's own blocks.
        The family's own blocks (``block_classes``) project queries and run the MLP for the kept tokens only.
        """
        block = self.blocks[index]
        if skip is None and context is None and kv is None:
            return whole_block(block, tokens)
        if type(block).__name__ in self.block_classes and not self.training:  # (training: the block's own dropout)
            return self._pre_norm_block(block, tokens, skip, context, kv)
        if kv is not None:
            raise ValueError(
                f"key-value prompts need vptune's own pass through {type(block).__name__}, which it has for the "
                f"{self.family} family's frozen blocks only (not while the backbone's own dropout trains)"
            )
        length = tokens.shape[1]  # an undeclared layout: the whole block on everything, then the selection
        if context is not None:
            tokens = torch.cat([tokens, context.expand(tokens.shape[0], -1, -1)], dim=1)
        return drop_tokens(whole_block(block, tokens)[:, :length], skip)

    def _pre_norm_block(
        self,
        block: nn.Module,
        tokens: torch.Tensor,
        skip: tuple[int, int] | None,
        context: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``x + ls1(attn(norm1(x)))`` then ``+ ls2(mlp(norm2(.)))``, with queries from the kept tokens only and
        ``kv`` (if any) after the projected keys and values."""
        parts = {role: block.get_submodule(path) for role, path in self.part_paths(block).items()}
        heads = self.model.config.num_attention_heads
        normed = parts["norm1"](tokens)
        sources = normed  # of keys and values; a batch-1 context is normalised once and broadcast
        if context is not None:
            extra = parts["norm1"](context).to(normed.dtype).expand(tokens.shape[0], -1, -1)
            sources = torch.cat([normed, extra], dim=1)

        def split_heads(states: torch.Tensor) -> torch.Tensor:
            return states.unflatten(-1, (heads, -1)).transpose(1, 2)

        query = split_heads(parts["q"](drop_tokens(normed, skip)))
        keys, values = split_heads(parts["k"](sources)), split_heads(parts["v"](sources))
        if kv is not None:
            extra_keys, extra_values = (split_heads(t.to(keys.dtype).expand(tokens.shape[0], -1, -1)) for t in kv)
            keys, values = torch.cat([keys, extra_keys], dim=2), torch.cat([values, extra_values], dim=2)
        attended = F.scaled_dot_product_attention(query, keys, values).transpose(1, 2).flatten(2)
        hidden = drop_tokens(tokens, skip) + _scaled(block, "layer_scale1", parts["o"](attended))
        return hidden + _scaled(block, "layer_scale2", parts["mlp"](parts["norm2"](hidden)))

    def context_key_values(self, index: int, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``k(norm1(context))`` and ``v(norm1(context))`` of block ``index``: what :meth:`_pre_norm_block` makes of a
        context, (T, n, d) each; None for a block it does not run (another layout, or the backbone's dropout on)."""
        block = self.blocks[index]
        if type(block).__name__ not in self.block_classes or self.training:
            return None
        parts = self.part_paths(block)
        normed = block.get_submodule(parts["norm1"])(context)
        return block.get_submodule(parts["k"])(normed), block.get_submodule(parts["v"])(normed)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's own output: every token after the final norm, (B, prefix + #patches, d)."""
        tokens = self.embed(pixel_values)
        for index in range(self.depth):
            tokens = self.run_block(index, tokens)
        return self.norm(tokens)

    # --- where a block keeps each part (adapters, LoRA) ---------------------------------------------------------
    def part_paths(self, block: nn.Module) -> dict[str, str]:
        """Where a block of the family keeps each part (``block_parts``), found once per block class."""
        kind = type(block)
        if kind not in self._paths:
            names = dict(block.named_modules())
            found = {role: next((p for p in paths if p in names), None) for role, paths in self.block_parts.items()}
            missing = [", ".join(self.block_parts[role]) for role, path in found.items() if path is None]
            if missing:
                raise ValueError(
                    f"{kind.__name__} has none of {'; '.join(missing)}: not the block layout the {self.family} "
                    "adapter expects"
                )
            self._paths[kind] = found
        return self._paths[kind]

    def mlp_output(self, index: int) -> nn.Linear:
        """The output projection of block ``index``'s MLP (its second linear layer)."""
        return self._linear(index, "mlp_out", f"the MLP output of block {index}")

    def attention_projections(self, index: int) -> dict[str, nn.Linear]:
        """Block ``index``'s attention projections by role: ``q``, ``k``, ``v`` and ``o`` (the output)."""
        return {role: self._linear(index, role, f"the {role} projection of block {index}") for role in "qkvo"}

    def _linear(self, index: int, role: str, what: str) -> nn.Linear:
        block, paths = self.blocks[index], self.block_parts.get(role, ())
        for path in paths:
            try:
                module = block.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, nn.Linear):
                return module
        raise ValueError(
            f"cannot find {what} (looked for {', '.join(paths) or 'nothing: no layout declared'} in "
            f"{type(block).__name__}): this backbone's blocks are laid out differently; adapters and LoRA need a "
            "Linear there"
        )

    # --- prompting ----------------------------------------------------------------------------------------------
    def resolve_prompt(self, config: PromptConfig) -> PromptConfig:
        """Location ``prepend`` and the family's read-out where unset; a ConvNet's locations refused, and key-value
        prompts where the family's block layout is unknown."""
        if config.location in CONV_LOCATIONS:
            raise ValueError(
                f"location {config.location!r} prompts a ConvNet's pixels; {self.family} is a Transformer: use "
                "prepend (the default), add, prepend-pixel or concat-channel"
            )
        if config.kv_tokens and not self.block_classes:
            raise ValueError(
                f"PromptConfig: kv_tokens needs the attention's separate key and value projections, and vptune does "
                f"not know the layout of {self.family}'s blocks (timm's fuse q, k and v in one Linear): use an hf: "
                "backbone (ViT, DINOv2, CLIP, MAE, Swin) for key-value prompts, or set kv_tokens to 0"
            )
        if config.resolved:
            return config
        return dataclasses.replace(
            config, location=config.location or "prepend", readout=config.readout or self.default_readout
        )

    def new_prompts(
        self, config: PromptConfig, preprocessing: Preprocessing, generator: torch.Generator | None = None
    ) -> PromptModule | None:
        return Prompts(config, self, preprocessing.image_size, generator=generator) if config.enabled else None

    def prompted_backbone(self, config: PromptConfig, generator: torch.Generator | None = None) -> Backbone:
        """``concat-channel`` prompts widen the patch embedding, which then trains whole (as the released code
        does): on a copy, where the tensors this backbone trains (e.g. VPT-Deep+bias's) train too."""
        if not config.enabled or config.location != "concat-channel":
            return self
        trained = self.names_of(self.patch_embed) | self.trained_names()
        return self.own_copy(trained.__contains__)

    def prompted_input(self, pixel_values: torch.Tensor, run: PromptPass) -> torch.Tensor:
        """The embedded tokens, with what ``concat-channel`` prompts add to each patch token."""
        delta = run.prompts.patch_delta(run.task_ids, pixel_values) if run.prompts is not None else None
        return self.embed(pixel_values, patch_delta=delta)

    def prompted_features(self, hidden: torch.Tensor, start: int, run: PromptPass) -> torch.Tensor:
        return flat_features(self, hidden, start, run)


def layout(
    norm1: str, norm2: str, q: Paths, k: Paths, v: Paths, o: Paths, mlp: Paths = "mlp", mlp_out: Paths = "mlp.fc2"
) -> dict[str, tuple[str, ...]]:
    """A family's ``block_parts``: the path (or candidate paths, newest first) of each part of a pre-norm block, by
    role: the two norms, the attention projections q, k, v and o (output), the MLP and its output projection."""
    roles = {"norm1": norm1, "norm2": norm2, "q": q, "k": k, "v": v, "o": o, "mlp": mlp, "mlp_out": mlp_out}
    return {role: (paths,) if isinstance(paths, str) else tuple(paths) for role, paths in roles.items()}


def whole_block(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``block(tokens)``, with no attention mask passed where the block's ``forward`` requires one (CLIP)."""
    return block(tokens, None) if _requires_mask(type(block)) else block(tokens)


@functools.cache
def _requires_mask(kind: type) -> bool:
    # transformers' blocks differ by family and release: DINOv2's took (hidden_states) alone in 5.17, a mask
    # after; CLIP's mask has no default
    parameter = inspect.signature(kind.forward).parameters.get("attention_mask")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _scaled(block: nn.Module, name: str, states: torch.Tensor) -> torch.Tensor:
    scale = getattr(block, name, None)
    return states if scale is None else scale(states)
