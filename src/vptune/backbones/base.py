"""What every backbone family provides, and the behaviour built on it.

The prompt code sees only this interface (embed, blocks, norm and a few numbers); it never knows which family it
runs on. A family is a subclass in a module of its own that says where its model keeps each part.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Paths = str | tuple[str, ...]


class Backbone(nn.Module):
    """A frozen vision Transformer seen as: embedding, a list of blocks, a final norm.

    Attributes:
        spec: how the backbone was asked for (``"dinov2-small"``, ``"hf:..."``); recorded in task files.
        family: the adapter's name (``"vit"``, ``"dinov2"``, ``"clip"``).
        width: token width d.
        depth: number of blocks N.
        patch_size: patch side s in pixels.
        num_prefix_tokens: class token plus any register tokens, in front of the patch tokens.
        in_chans: input channels of the patch embedding.
        image_size: native input side.
        mean, std: the normalisation the backbone was pretrained with.
        tuned_parameters: pretrained parameters that a method's private copy trains (see :meth:`own_copy`).
    """

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()  # transformers ``config.model_type`` values this family loads
    model_classes: ClassVar[tuple[str, ...]] = ()  # transformers model classes this family wraps
    default_mean: ClassVar[tuple[float, ...]] = IMAGENET_MEAN
    default_std: ClassVar[tuple[float, ...]] = IMAGENET_STD
    load_options: ClassVar[dict] = {}  # keyword arguments of ``from_pretrained``
    # The family's own block classes, and where they keep each part by role (see ``layout``): candidate paths,
    # newest transformers names first. Such blocks compute only the tokens whose outputs are read; any other block
    # (another layout, or a module a user put in) runs whole. ``layer_scale1/2`` are used where a block has them.
    block_classes: ClassVar[tuple[str, ...]] = ()
    block_parts: ClassVar[dict[str, tuple[str, ...]]] = {}
    default_readout: ClassVar[str] = "cls"  # the head's input when the prompt config leaves ``readout`` unset
    pool_before_norm: ClassVar[bool] = False  # True: the read-out pools the last block's outputs, then ``norm`` (MAE)
    has_tokens: ClassVar[bool] = True  # False: a ConvNet (backbones.convnet), whose prompts are pixels
    # A family whose token grid changes between stages (Swin): the prompted forward is its own (``staged_features``)
    staged: ClassVar[bool] = False

    def __init__(self, model: nn.Module, spec: str, mean: Sequence[float], std: Sequence[float], image_size: int):
        super().__init__()
        self.model = model
        self.spec = spec
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_size = int(image_size)
        config = self.config_of(model)
        self.width, self.depth, self.patch_size = self.dimensions(config)
        self.in_chans = int(getattr(config, "num_channels", 3))
        self.num_prefix_tokens = 1
        self._fingerprint: str | None = None
        self._paths: dict[type, dict[str, str]] = {}
        self._num_parameters = sum(p.numel() for p in model.parameters())
        self.tuned_parameters = 0
        self.dropout_in_training = False  # full fine-tuning keeps the model's own dropout (see own_copy)
        model.requires_grad_(False)
        self.train(False)

    # --- what each family provides -------------------------------------------------------------
    @classmethod
    def config_of(cls, model: nn.Module):
        """The model's configuration as the methods below read it (a transformers model's ``config``)."""
        return model.config

    @classmethod
    def dimensions(cls, config) -> tuple[int, int, int]:
        """Width d, depth N and patch side s from a transformers config."""
        return int(config.hidden_size), int(config.num_hidden_layers), int(config.patch_size)

    @classmethod
    def native_size(cls, config) -> int:
        """The input side the family's preprocessing uses, from a transformers config."""
        return int(config.image_size)

    @classmethod
    def load_model(cls, source: str, dtype: torch.dtype) -> nn.Module:
        """The transformers model in ``source`` (a Hub id or a local folder)."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(source, dtype=dtype, **cls.load_options)

    @property
    def patch_embed(self) -> nn.Conv2d:
        """The patch-embedding convolution (kernel = stride = patch size)."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        """The Transformer blocks, in order."""
        raise NotImplementedError

    @property
    def norm(self) -> nn.Module:
        """The final norm, applied to every token."""
        raise NotImplementedError

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        """Class token (before positions are added), shape (batch, 1, d)."""
        raise NotImplementedError

    def positions(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings for ``[cls, patches]``, interpolated to the input grid as the family does."""
        raise NotImplementedError

    def after_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Anything the family inserts after positions (registers) or applies before block 1 (CLIP's pre-norm)."""
        return tokens

    def block_width(self, index: int) -> int:
        """Block ``index``'s token width (the same for every block of a plain ViT)."""
        return self.width

    def check_prompt(self, config) -> None:
        """Refuse, with the reason, a prompt configuration (a :class:`~vptune.PromptConfig`) the family cannot take."""
        if config.kv_tokens and not self.block_classes:
            raise ValueError(
                f"PromptConfig: kv_tokens needs the attention's separate key and value projections, and vptune does "
                f"not know the layout of {self.family}'s blocks (timm's fuse q, k and v in one Linear): use an hf: "
                "backbone (ViT, DINOv2, CLIP, MAE, Swin) for key-value prompts, or set kv_tokens to 0"
            )

    # --- shared behaviour ----------------------------------------------------------------------
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

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's own output: every token after the final norm, (B, prefix + #patches, d)."""
        tokens = self.embed(pixel_values)
        for index in range(self.depth):
            tokens = self.run_block(index, tokens)
        return self.norm(tokens)

    def num_patches(self, image_size: int) -> int:
        """Patch tokens for a square input of side ``image_size``."""
        return (image_size // self.patch_size) ** 2

    def num_parameters(self) -> int:
        """Parameters of the pretrained backbone (modules a method inserts later are not counted)."""
        return self._num_parameters

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

    def train(self, mode: bool = True) -> Backbone:
        """The backbone stays in eval mode (its dropout off), whatever the mode of the model around it; a copy made
        with ``dropout_in_training`` (full fine-tuning) follows the model's mode, its own dropout as configured."""
        super().train(mode and self.dropout_in_training)
        return self

    def names_of(self, module: nn.Module) -> set[str]:
        """``named_parameters()`` names (relative to this backbone) of ``module``'s parameters."""
        ids = {id(p) for p in module.parameters()}
        return {name for name, p in self.named_parameters() if id(p) in ids}

    def own_copy(self, trains: Callable[[str], bool] = lambda name: False, dropout: bool = False) -> Backbone:
        """A copy for one model: frozen tensors shared, tensors named by ``trains`` copied and unfrozen.

        A method that changes the backbone's weights or computation works on such a copy, never on the backbone
        it was given (other tasks share it). ``trains(name)`` is asked for each ``named_parameters()`` name; with
        ``dropout`` the copy runs its own dropout while the model trains. The copy keeps this backbone's
        fingerprint: task files record the pretrained weights a task started from.
        """
        self.fingerprint()  # cached before copying, so the copy reports the pretrained weights
        chosen = {name for name, _ in self.named_parameters() if trains(name)}
        memo = {id(p): p for name, p in self.named_parameters() if name not in chosen}
        memo.update({id(b): b for b in self.buffers()})
        clone = copy.deepcopy(self, memo)
        for name, param in clone.named_parameters():
            param.requires_grad_(name in chosen)
        clone.tuned_parameters = sum(p.numel() for name, p in clone.named_parameters() if name in chosen)
        clone.dropout_in_training = dropout
        return clone

    def fingerprint(self) -> str:
        """A SHA-256 over every weight's name, shape, dtype and bytes (first 16 hex digits); cached."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                data = tensor.detach().to("cpu").contiguous()
                digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
                # reshape: a 0-dim tensor (a BatchNorm's batch counter) has no byte view of its own
                digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def record(self) -> dict:
        """What a task file stores about the backbone."""
        return {
            "spec": self.spec,
            "family": self.family,
            "fingerprint": self.fingerprint(),
            "width": self.width,
            "depth": self.depth,
            "patch_size": self.patch_size,
            "parameters": self.num_parameters(),
            "tuned_parameters": self.tuned_parameters,
        }

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, family={self.family}, width={self.width}, depth={self.depth}"


def layout(
    norm1: str, norm2: str, q: Paths, k: Paths, v: Paths, o: Paths, mlp: Paths = "mlp", mlp_out: Paths = "mlp.fc2"
) -> dict[str, tuple[str, ...]]:
    """A family's ``block_parts``: the path (or candidate paths, newest first) of each part of a pre-norm block, by
    role: the two norms, the attention projections q, k, v and o (output), the MLP and its output projection."""
    roles = {"norm1": norm1, "norm2": norm2, "q": q, "k": k, "v": v, "o": o, "mlp": mlp, "mlp_out": mlp_out}
    return {role: (paths,) if isinstance(paths, str) else tuple(paths) for role, paths in roles.items()}


def split_range(tokens: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tokens`` (B, T, d) as the pieces before ``start``, ``start..stop-1`` and from ``stop`` on.

    One split rather than slices: its backward concatenates the pieces' gradients (zeros only for an unused piece),
    where every slice's backward would zero-fill and add a whole sequence-sized gradient.
    """
    return tokens.split([start, stop - start, tokens.shape[1] - stop], dim=1)


def drop_tokens(tokens: torch.Tensor, skip: tuple[int, int] | None) -> torch.Tensor:
    """``tokens`` (B, T, d) without positions ``skip[0]..skip[1]-1`` (all of them where ``skip`` is None)."""
    if skip is None:
        return tokens
    before, _, after = split_range(tokens, *skip)
    return after if not before.shape[1] else before if not after.shape[1] else torch.cat([before, after], dim=1)


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
