"""MoCo-v3 ViT checkpoints (``.pth.tar``) as transformers ``ViTModel`` folders, loadable as ``hf:<folder>``.

MoCo v3 publishes its ViTs as PyTorch checkpoints of a timm ``VisionTransformer``: ``checkpoint["state_dict"]``
holds the pretraining run's ``module.base_encoder.*`` and ``module.momentum_encoder.*`` (each with a projection
``head``), or, for a linear-probing checkpoint, the encoder under ``module.*``. The positions are a fixed 2-D
sin-cos table with a zero class position, stored in the checkpoint; every LayerNorm has eps 1e-6. The converted
model reads out as a plain ViT does: the class token after the final norm.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD

ENCODERS = ("base", "momentum")
LAYER_NORM_EPS = 1e-6  # every norm of MoCo v3's ViTs (timm's, built with eps 1e-6)
HEADS = {384: 12, 768: 12, 1024: 16, 1280: 16}  # MoCo v3's vit_small/base/large/huge (its ViT-S has 12 heads)
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def convert_mocov3(
    checkpoint: str | Path, out_folder: str | Path, encoder: str = "base", heads: int | None = None
) -> Path:
    """Write a MoCo-v3 ViT checkpoint as a transformers ``ViTModel`` folder (``config.json``, ``model.safetensors``
    and ``preprocessor_config.json`` with ImageNet normalisation); returns the folder.

    The checkpoint is read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
    arbitrary pickled objects.

    Args:
        checkpoint: a MoCo v3 ``.pth.tar`` (pretraining or linear probing), or a ``{"model": ...}`` file of its
            ``convert_to_deit.py``.
        out_folder: where to write the model (created if needed).
        encoder: ``"base"`` or ``"momentum"``: which encoder of a pretraining checkpoint to take.
        heads: attention heads; by default MoCo v3's for the width (12 for 384 and 768, 16 for 1024 and 1280).

    Raises:
        ValueError: the file cannot be read safely, holds no MoCo-v3 ViT encoder, or its shapes are inconsistent.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    weights = timm_encoder(_read(Path(checkpoint)), encoder, str(checkpoint))
    config = _config(weights, heads, str(checkpoint))
    from transformers import ViTModel

    model = ViTModel(config, add_pooling_layer=False)
    try:
        model.load_state_dict(to_vit(weights, config.num_hidden_layers, str(checkpoint)), strict=True)
    except RuntimeError as error:  # shapes that do not fit a ViT of the inferred size
        raise ValueError(f"{checkpoint} is not a consistent ViT: {error}") from error
    out = Path(out_folder)
    model.save_pretrained(out)
    _write_preprocessing(out, config.image_size)
    return out


def _write_preprocessing(out: Path, side: int) -> None:
    """MoCo v3's input: ImageNet mean and std, at the side its positions were built for."""
    settings = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }
    (out / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"no checkpoint file at {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways (KeyError, UnpicklingError ...) on other files
        if "weights only load failed" not in str(error).lower():
            raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {error}") from error
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, which vptune does not unpickle (they "
            "can run code). Re-save its state dict alone from a Python session you trust: "
            "torch.save({'state_dict': checkpoint['state_dict']}, path)"
        ) from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a MoCo-v3 checkpoint: it holds a {type(data).__name__}, not a dict")
    return data


def timm_encoder(data: dict, encoder: str, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The encoder's tensors under timm's names (``blocks.0.attn.qkv.weight`` ...), the projection head left out.

    ``data`` is a loaded checkpoint: ``{"state_dict": ...}`` (MoCo v3's), ``{"model": ...}`` (after its
    ``convert_to_deit.py``) or a bare state dict.
    """
    state = data.get("state_dict", data.get("model", data))
    if not isinstance(state, dict):
        raise ValueError(f"{where} is not a MoCo-v3 checkpoint: its state dict is a {type(state).__name__}")
    pretraining = any(f"{name}_encoder." in key for key in state for name in ENCODERS)
    if not pretraining and encoder != "base":
        raise ValueError(f"{where} holds one encoder only (not a pretraining checkpoint): leave the encoder at base")
    prefixes = (f"module.{encoder}_encoder.", f"{encoder}_encoder.") if pretraining else ("module.", "")
    for prefix in prefixes:
        if f"{prefix}patch_embed.proj.weight" in state:
            return {
                name[len(prefix) :]: tensor
                for name, tensor in state.items()
                if name.startswith(prefix) and not name[len(prefix) :].startswith("head.")
            }
    sample = ", ".join(list(state)[:4]) or "none"
    resnet = any(name.split(".")[-2:-1] == ["conv1"] for name in state)
    hint = " (a ResNet: only MoCo-v3 ViTs convert)" if resnet else ""
    raise ValueError(
        f"{where} is not a MoCo-v3 ViT checkpoint{hint}: no '{encoder}' encoder's patch_embed.proj.weight among "
        f"its keys (first: {sample}); give a MoCo v3 ViT .pth.tar, and --encoder momentum for the momentum encoder"
    )


def _config(weights: dict[str, torch.Tensor], heads: int | None, where: str):
    from transformers import ViTConfig

    required = (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.mlp.fc1.weight",
    )
    missing = [name for name in required if name not in weights]
    if missing:
        raise ValueError(f"{where} is not a MoCo-v3 ViT checkpoint: its encoder lacks {', '.join(missing)}")
    width, channels, patch, _ = weights["patch_embed.proj.weight"].shape
    depth = 1 + max(int(match[1]) for name in weights if (match := _BLOCK.match(name)))
    heads = heads or HEADS.get(width)
    if heads is None:
        raise ValueError(f"no default head count for width {width}: pass the model's (--heads in the CLI)")
    if heads < 1 or width % heads:
        raise ValueError(f"{heads} attention heads do not divide the width {width}: pass the model's head count")
    grid = round((weights["pos_embed"].shape[1] - 1) ** 0.5)
    if grid * grid + 1 != weights["pos_embed"].shape[1]:
        raise ValueError(f"{where}: pos_embed has {weights['pos_embed'].shape[1]} rows, not 1 + a square grid")
    return ViTConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=weights["blocks.0.mlp.fc1.weight"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        qkv_bias="blocks.0.attn.qkv.bias" in weights,
    )


def to_vit(weights: dict[str, torch.Tensor], depth: int, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """timm ViT tensors renamed to transformers ``ViTModel``'s, each fused qkv split into query, key and value.

    Raises:
        ValueError: a tensor of the layout is missing, or the encoder holds tensors the layout has no place for
            (another architecture: converting it would silently drop them).
    """
    left = dict(weights)

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise ValueError(f"{where}: the encoder lacks {name}, which a MoCo-v3 ViT has")
        return left.pop(name)

    out = {
        "embeddings.cls_token": take("cls_token"),
        "embeddings.position_embeddings": take("pos_embed"),
        "embeddings.patch_embeddings.projection.weight": take("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": take("patch_embed.proj.bias"),
        "layernorm.weight": take("norm.weight"),
        "layernorm.bias": take("norm.bias"),
    }
    parts = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj"}
    parts |= {"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for index in range(depth):
        theirs, ours = f"blocks.{index}.", f"layers.{index}."
        for kind in ("weight", "bias"):
            for source, target in parts.items():
                out[f"{ours}{target}.{kind}"] = take(f"{theirs}{source}.{kind}")
            if kind == "bias" and f"{theirs}attn.qkv.bias" not in left:
                continue  # qkv without bias
            fused = take(f"{theirs}attn.qkv.{kind}")  # rows: every query, then every key, then every value
            for role, piece in zip("qkv", fused.chunk(3, dim=0), strict=True):
                out[f"{ours}attention.{role}_proj.{kind}"] = piece.contiguous()
    if left:
        raise ValueError(f"{where}: the encoder holds tensors a MoCo-v3 ViT does not have: {', '.join(sorted(left))}")
    return out
