"""Frozen backbones: a small adapter per model family, chosen by a spec string.

The prompt code sees only what :class:`Backbone` exposes (embed, blocks, norm and a few numbers); it never
knows which family it runs on. Adding a family is adding a subclass and one line in ``FAMILIES``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Short names: a local folder (under $VPTUNE_WEIGHTS or ../shared/weights) tried first, then the Hub id.
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "dinov2-small": ("dinov2-small-imgfocus", "facebook/dinov2-small"),
    "dinov2-base": ("dinov2-base", "facebook/dinov2-base"),
    "vit-base-in21k": ("vit-base-patch16-224-in21k", "google/vit-base-patch16-224-in21k"),
    "clip-vit-base": ("clip-vit-base-patch16", "openai/clip-vit-base-patch16"),
}
SPEC_FORMS = (
    f"'hf:<hub id>' (e.g. hf:facebook/dinov2-small), 'hf:<local folder>', or a short name ({', '.join(SHORT_NAMES)})"
)


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
    """

    family = "base"

    def __init__(self, model: nn.Module, spec: str, mean: Sequence[float], std: Sequence[float], image_size: int):
        super().__init__()
        self.model = model
        self.spec = spec
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_size = int(image_size)
        config = model.config
        self.width = int(config.hidden_size)
        self.depth = int(config.num_hidden_layers)
        self.patch_size = int(config.patch_size)
        self.in_chans = int(getattr(config, "num_channels", 3))
        self.num_prefix_tokens = 1
        self._fingerprint: str | None = None
        self._num_parameters = sum(p.numel() for p in model.parameters())
        self.tuned_parameters = 0  # pretrained parameters a method's private copy trains (see modules.own_backbone)
        model.requires_grad_(False)
        model.eval()

    # --- what each family provides -------------------------------------------------------------
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
    ) -> torch.Tensor:
        """Apply block ``index`` to a token sequence (no attention mask).

        ``skip = (start, stop)``: the outputs of tokens ``start..stop-1`` are never read, so they are not computed;
        those tokens still serve as keys and values, and the result holds the other tokens, in order.
        ``context`` (1 or B, n, d): tokens that take part in attention as keys and values only, their outputs never
        computed; for a block, which sees no positions, the same as inserting them anywhere in the sequence and
        skipping their outputs (VPT-Deep's prompts, replaced by the next block's, without moving the sequence).
        The blocks of known layouts (ViT, DINOv2, CLIP) project queries and run the MLP for the kept tokens only.
        """
        block = self.blocks[index]
        if skip is None and context is None:
            return _whole_block(block, tokens)
        if type(block).__name__ in PRE_NORM_BLOCKS:
            return self._pre_norm_block(block, tokens, skip, context)
        length = tokens.shape[1]  # an unknown layout: the whole block on everything, then the selection
        if context is not None:
            tokens = torch.cat([tokens, context.expand(tokens.shape[0], -1, -1)], dim=1)
        outputs = _whole_block(block, tokens)[:, :length]
        return drop_tokens(outputs, skip)

    def _pre_norm_block(
        self, block: nn.Module, tokens: torch.Tensor, skip: tuple[int, int] | None, context: torch.Tensor | None
    ) -> torch.Tensor:
        """``x + ls1(attn(norm1(x)))`` then ``+ ls2(mlp(norm2(.)))``, with queries from the kept tokens only."""
        parts = {role: block.get_submodule(path) for role, path in _block_paths(block).items()}
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
        attended = F.scaled_dot_product_attention(query, keys, values).transpose(1, 2).flatten(2)
        hidden = drop_tokens(tokens, skip) + _scaled(block, "layer_scale1", parts["o"](attended))
        return hidden + _scaled(block, "layer_scale2", block.mlp(parts["norm2"](hidden)))

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
        return _find_linear(self.blocks[index], MLP_OUTPUT_PATHS, f"the MLP output of block {index}")

    def attention_projections(self, index: int) -> dict[str, nn.Linear]:
        """Block ``index``'s attention projections by role: ``q``, ``k``, ``v`` and ``o`` (the output)."""
        block = self.blocks[index]
        return {
            role: _find_linear(block, paths, f"the {role} projection of block {index}")
            for role, paths in ATTENTION_PATHS.items()
        }

    def train(self, mode: bool = True) -> Backbone:
        """The backbone stays in eval mode (its dropout off), whatever the mode of the model around it."""
        super().train(False)
        return self

    def fingerprint(self) -> str:
        """A SHA-256 over every weight's name, shape, dtype and bytes (first 16 hex digits); cached."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                data = tensor.detach().to("cpu").contiguous()
                digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
                digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
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


# Where blocks keep their linear layers, across families and transformers versions (4.x names last).
MLP_OUTPUT_PATHS = ("mlp.fc2", "output.dense")
ATTENTION_PATHS = {
    "q": ("attention.q_proj", "self_attn.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "self_attn.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "self_attn.v_proj", "attention.attention.value"),
    "o": ("attention.o_proj", "self_attn.out_proj", "attention.output.dense"),
}


# Pre-norm blocks whose parts (the paths below, ``mlp``, optional ``layer_scale1/2``) compose as in
# Backbone._pre_norm_block, their dropout and drop-path being off in the frozen backbone.
PRE_NORM_BLOCKS = ("ViTLayer", "Dinov2Layer", "Dinov2WithRegistersLayer", "CLIPEncoderLayer")
BLOCK_PATHS = {
    "norm1": ("norm1", "layernorm_before", "layer_norm1"),
    "norm2": ("norm2", "layernorm_after", "layer_norm2"),
    **ATTENTION_PATHS,
}


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


def _whole_block(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``block(tokens)``, with no attention mask passed where the block's ``forward`` requires one (CLIP)."""
    return block(tokens, None) if _requires_mask(type(block)) else block(tokens)


@functools.cache
def _requires_mask(kind: type) -> bool:
    # transformers' blocks differ by family and release: DINOv2's took (hidden_states) alone in 5.17, a mask
    # after; CLIP's mask has no default
    parameter = inspect.signature(kind.forward).parameters.get("attention_mask")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def _block_paths(block: nn.Module) -> dict[str, str]:
    """Where a block's parts are, by role (``BLOCK_PATHS``); looked up once per block class."""
    kind = type(block)
    if kind not in _PATHS_BY_CLASS:
        names = dict(block.named_modules())
        found = {role: next((path for path in paths if path in names), None) for role, paths in BLOCK_PATHS.items()}
        missing = [", ".join(BLOCK_PATHS[role]) for role, path in found.items() if path is None]
        if missing:
            raise ValueError(f"{kind.__name__} has none of {'; '.join(missing)}: not the pre-norm layout expected")
        _PATHS_BY_CLASS[kind] = found
    return _PATHS_BY_CLASS[kind]


_PATHS_BY_CLASS: dict[type, dict[str, str]] = {}


def _scaled(block: nn.Module, name: str, states: torch.Tensor) -> torch.Tensor:
    scale = getattr(block, name, None)
    return states if scale is None else scale(states)


def quick_gelu(states: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` (CLIP's activation), keeping only ``x`` for the backward, where autograd keeps
    ``x`` and the sigmoid: in a frozen block that input is the largest tensor kept."""
    return _QuickGelu.apply(states)


class QuickGelu(nn.Module):
    """CLIP's activation as a module: transformers' ``QuickGELUActivation``, keeping half as much for the backward."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return quick_gelu(states)


class _QuickGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(states)
        return states * torch.sigmoid(1.702 * states)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (states,) = ctx.saved_tensors
        gate = torch.sigmoid(1.702 * states)
        return grad * gate * (1 + 1.702 * states * (1 - gate))


def _find_linear(block: nn.Module, paths: Sequence[str], what: str) -> nn.Linear:
    for path in paths:
        try:
            module = block.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear):
            return module
    raise ValueError(
        f"cannot find {what} (looked for {', '.join(paths)} in {type(block).__name__}): "
        "this backbone's blocks are laid out differently; adapters and LoRA need a Linear there"
    )


class ViTBackbone(Backbone):
    """transformers ``ViTModel`` (e.g. google/vit-base-patch16-224-in21k)."""

    family = "vit"

    @property
    def patch_embed(self) -> nn.Conv2d:
        return self.model.embeddings.patch_embeddings.projection

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers if hasattr(self.model, "layers") else self.model.encoder.layer

    @property
    def norm(self) -> nn.Module:
        return self.model.layernorm

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        return self.model.embeddings.cls_token.expand(batch, -1, -1)

    def positions(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.model.embeddings.interpolate_pos_encoding(tokens, height, width)


class Dinov2Backbone(ViTBackbone):
    """transformers ``Dinov2Model`` and ``Dinov2WithRegistersModel`` (LayerScale; registers after positions)."""

    family = "dinov2"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_prefix_tokens = 1 + int(getattr(self.model.config, "num_register_tokens", 0))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def after_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        registers = getattr(self.model.embeddings, "register_tokens", None)
        if registers is None:
            return tokens
        registers = registers.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        return torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)


class ClipBackbone(Backbone):
    """transformers ``CLIPVisionModel``: a pre-norm before block 1; the post-norm serves as the final norm.

    The MLPs' quick GELU becomes ``QuickGelu``: the same values, half the activations kept for the backward.
    """

    family = "clip"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.blocks:
            if type(block.mlp.activation_fn).__name__ == "QuickGELUActivation":
                block.mlp.activation_fn = QuickGelu()

    @property
    def patch_embed(self) -> nn.Conv2d:
        return self.model.embeddings.patch_embedding

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layers

    @property
    def norm(self) -> nn.Module:
        return self.model.post_layernorm

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        return self.model.embeddings.class_embedding.expand(batch, 1, -1)

    def positions(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.model.embeddings.interpolate_pos_encoding(tokens, height, width)

    def after_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.pre_layrnorm(tokens)


# transformers class name -> (adapter, default mean, default std)
FAMILIES: dict[str, tuple[type[Backbone], tuple, tuple]] = {
    "ViTModel": (ViTBackbone, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "Dinov2Model": (Dinov2Backbone, IMAGENET_MEAN, IMAGENET_STD),
    "Dinov2WithRegistersModel": (Dinov2Backbone, IMAGENET_MEAN, IMAGENET_STD),
    "CLIPVisionModel": (ClipBackbone, CLIP_MEAN, CLIP_STD),
}


def wrap_model(model: nn.Module, spec: str = "custom", preprocessing: dict | None = None) -> Backbone:
    """Wrap an already built transformers vision model (e.g. a tiny random one) as a :class:`Backbone`.

    Args:
        model: a ``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel`` or ``CLIPVisionModel``.
        spec: the name recorded in task files.
        preprocessing: optional ``{"mean", "std", "image_size"}`` overriding the family defaults.
    """
    kind = type(model).__name__
    if kind not in FAMILIES:
        raise ValueError(f"unsupported backbone class {kind}; supported: {', '.join(FAMILIES)}")
    adapter, mean, std = FAMILIES[kind]
    prep = {"mean": mean, "std": std, "image_size": _native_size(model.config)}
    prep.update(preprocessing or {})
    return adapter(model, spec, prep["mean"], prep["std"], prep["image_size"])


def _native_size(config) -> int:
    # DINOv2 configs say 518 (the pretraining crop); their preprocessing and every benchmark use 224.
    if config.model_type in ("dinov2", "dinov2_with_registers"):
        return 224
    return int(config.image_size)


def resolve_spec(spec: str) -> str:
    """Turn a spec into what ``from_pretrained`` takes: a local folder or a Hub id."""
    if spec.startswith("hf:"):
        target = spec[3:]
        if not target:
            raise ValueError(f"empty backbone spec {spec!r}; accepted forms: {SPEC_FORMS}")
        return target
    if spec in SHORT_NAMES:
        folder, hub_id = SHORT_NAMES[spec]
        for root in _weight_roots():
            if (root / folder / "config.json").is_file():
                return str(root / folder)
        return hub_id
    if spec.startswith("timm:"):
        raise ValueError(f"timm backbones are not supported yet ({spec!r}); accepted forms: {SPEC_FORMS}")
    raise ValueError(f"unknown backbone spec {spec!r}; accepted forms: {SPEC_FORMS}")


def _weight_roots() -> list[Path]:
    roots = []
    if os.environ.get("VPTUNE_WEIGHTS"):
        roots.append(Path(os.environ["VPTUNE_WEIGHTS"]))
    roots.append(Path(__file__).resolve().parents[3] / "shared" / "weights")
    roots.append(Path.cwd().parent / "shared" / "weights")
    return roots


def load_backbone(spec: str, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a frozen pretrained backbone.

    Args:
        spec: ``"hf:<hub id>"``, ``"hf:<local folder>"`` or a short name such as ``"dinov2-small"``
            (``$VPTUNE_WEIGHTS/dinov2-small-imgfocus``, default ``../shared/weights``, else the Hub).
        dtype: weight dtype.
    """
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    source = resolve_spec(spec)
    try:
        config = AutoConfig.from_pretrained(source)
        if config.model_type == "clip":
            model = CLIPVisionModel.from_pretrained(source, dtype=dtype)
        elif config.model_type == "vit":  # the pooler is unused; a checkpoint without one would init it randomly
            model = AutoModel.from_pretrained(source, dtype=dtype, add_pooling_layer=False)
        else:
            model = AutoModel.from_pretrained(source, dtype=dtype)
    except OSError as error:
        raise ValueError(
            f"cannot load backbone {spec!r} from {source!r}: {error}. Pass a local folder as 'hf:<folder>' "
            "or set VPTUNE_WEIGHTS to the folder holding it."
        ) from error
    if type(model).__name__ == "CLIPModel":
        model = model.vision_model
    return wrap_model(model, spec, _preprocessor_config(source))


def _preprocessor_config(source: str) -> dict:
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    prep = {key: data[f"image_{key}"] for key in ("mean", "std") if f"image_{key}" in data}
    crop = data.get("crop_size") or data.get("size")
    if isinstance(crop, dict) and ("height" in crop or "shortest_edge" in crop):
        prep["image_size"] = int(crop.get("height", crop.get("shortest_edge")))
    return prep
