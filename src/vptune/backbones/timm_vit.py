"""timm's ``VisionTransformer`` (``timm:<model name>``), imported only when such a backbone is asked for.

timm needs torchvision, so it is an optional dependency: ``pip install timm`` where torchvision works (e.g. a CUDA
machine). Its blocks compute queries, keys and values in one fused Linear (``attn.qkv``), so they run whole: a block
computes every token's output and the unread ones are dropped (no block class is declared for the fast path of
:meth:`TokenBackbone.run_block`). Adapters go after each block's ``mlp.fc2``; LoRA adapts the attention output
(``attn.proj``) only, as q, k and v are not separate layers.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .base import Backbone
from .loading import SPEC_LOADERS, register_family, wrap_model
from .tokens import TokenBackbone, layout

TIMM_MEAN = (0.5, 0.5, 0.5)  # timm's default for its ViTs (pretrained_cfg overrides it when the model has one)
TIMM_STD = (0.5, 0.5, 0.5)
INSTALL_HINT = (
    "pip install timm, in an environment where torchvision works (e.g. a CUDA machine); timm is optional in vptune"
)
POOLS = ("token", "avg")  # timm global_pool values the adapter reads out as timm does
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@register_family
class TimmViTBackbone(TokenBackbone):
    """A timm ``VisionTransformer``: class token (and registers), learned positions, optional pre-norm.

    Positions follow the model's ``no_embed_class``: added to every token, or to the patches only (the class and
    register tokens then carry none). ``pos_drop`` and ``norm_pre`` apply after positions, as in timm; ``patch_drop``
    (training-time patch dropout) never runs: every patch is kept, as prompts sit at fixed places. The read-out
    is timm's ``forward_head(pre_logits=True)``: the class token after ``norm`` (``global_pool="token"``), or the
    mean of the patch tokens, through ``fc_norm`` where the model has one (``global_pool="avg"``).
    """

    family = "timm-vit"
    model_classes = ("VisionTransformer",)
    default_mean = TIMM_MEAN
    default_std = TIMM_STD
    block_parts = layout("norm1", "norm2", q=(), k=(), v=(), o="attn.proj", mlp_out="mlp.fc2")

    def __init__(self, model: nn.Module, *args, **kwargs):
        check_supported(model)
        super().__init__(model, *args, **kwargs)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        if model.global_pool == "avg":
            self.default_readout = "image"  # the mean of the patch tokens (timm's avg leaves the prefix out)
            self.pool_before_norm = not isinstance(model.fc_norm, nn.Identity)

    @classmethod
    def config_of(cls, model: nn.Module) -> SimpleNamespace:
        embed = model.patch_embed
        return SimpleNamespace(
            hidden_size=int(model.embed_dim),
            num_hidden_layers=len(model.blocks),
            patch_size=int(embed.patch_size[0]),
            num_channels=int(embed.proj.in_channels),
            image_size=int(embed.img_size[0]),
            num_attention_heads=int(model.blocks[0].attn.num_heads),
        )

    @property
    def patch_embed(self) -> nn.Conv2d:
        return self.model.patch_embed.proj

    @property
    def blocks(self) -> nn.Sequential:
        return self.model.blocks

    @property
    def norm(self) -> nn.Module:
        return self.model.fc_norm if self.pool_before_norm else self.model.norm

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        """The class token, then the register tokens where the model has them."""
        tokens = [t.expand(batch, -1, -1) for t in (self.model.cls_token, self.model.reg_token) if t is not None]
        return torch.cat(tokens, dim=1) if tokens else self.model.pos_embed.new_zeros(batch, 0, self.width)

    def positions(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """timm's ``pos_embed``, resampled as timm does for another grid; zeros for the prefix (``no_embed_class``)."""
        table, grid = self.model.pos_embed, (height // self.patch_size, width // self.patch_size)
        with_prefix = not self.model.no_embed_class
        native = tuple(self.model.patch_embed.grid_size)
        if grid != native:
            from timm.layers import resample_abs_pos_embed  # the model came from timm: it is installed

            prefix = self.num_prefix_tokens if with_prefix else 0
            table = resample_abs_pos_embed(table, new_size=list(grid), old_size=list(native), num_prefix_tokens=prefix)
        if with_prefix:
            return table
        return torch.cat([table.new_zeros(1, self.num_prefix_tokens, table.shape[-1]), table], dim=1)

    def after_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.norm_pre(self.model.pos_drop(tokens))

    def attention_projections(self, index: int) -> dict[str, nn.Linear]:
        """The attention output ``o`` only: q, k and v share one fused Linear (``attn.qkv``) in timm's blocks."""
        return FusedProjections(o=self._linear(index, "o", f"the output projection of block {index}"))


class FusedProjections(dict):
    """Attention projections by role, where q, k and v are one fused layer: asking for one of them is refused."""

    def __missing__(self, role: str) -> nn.Linear:
        raise ValueError(
            f"timm's ViT blocks compute q, k and v in one fused Linear (attn.qkv), so there is no separate {role!r} "
            "projection to adapt: use lora_targets=o on a timm: backbone, or an hf: ViT for q,k,v"
        )


def check_supported(model: nn.Module) -> None:
    """Refuse, saying why, a timm ViT whose embedding or read-out the adapter does not reproduce."""
    problems = []
    if getattr(model, "cls_token", None) is None and model.global_pool == "token":
        problems.append("it has no class token")
    if model.global_pool not in POOLS or getattr(model, "attn_pool", None) is not None:
        problems.append(f"its global_pool is {model.global_pool!r} (supported: {', '.join(POOLS)})")
    if getattr(model, "pos_embed", None) is None:
        problems.append("it has no learned position table (pos_embed)")
    if not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity):
        problems.append("its patch embedding has a norm")
    if model.patch_embed.patch_size[0] != model.patch_embed.patch_size[1]:
        problems.append(f"its patches are not square ({tuple(model.patch_embed.patch_size)})")
    if problems:
        raise ValueError(f"unsupported timm VisionTransformer: {'; '.join(problems)}")


def import_timm():
    """The ``timm`` package, or an error saying how to install it."""
    try:
        import timm
    except ImportError as error:
        raise ValueError(f"a timm: backbone needs the timm package, which is not installed: {INSTALL_HINT}") from error
    return timm


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """``timm:<name>`` or ``timm:<name>@<weights file>`` as (model name, weights file or None)."""
    name, _, weights = spec.removeprefix("timm:").partition("@")
    if not name:
        raise ValueError(f"empty timm model name in {spec!r}; write timm:<model name>[@<weights .safetensors>]")
    if not weights:
        return name, None
    path = Path(weights).expanduser()
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{spec!r}: the weights file must be one of {', '.join(WEIGHT_SUFFIXES)}, got {path.name!r}")
    if not path.is_file():
        raise ValueError(f"{spec!r}: no weights file at {path}")
    return name, path.resolve()


def load_timm(spec: str, dtype: torch.dtype = torch.float32) -> Backbone:
    """A frozen timm ViT from ``timm:<name>`` (timm's pretrained weights, from its cache or the Hub) or
    ``timm:<name>@<file>`` (the architecture with the weights of a ``.safetensors`` file, or of a PyTorch file read
    with ``torch.load(weights_only=True)``: never unpickled). The spec recorded names the file by its full path.
    """
    name, weights = parse_spec(spec)
    timm = import_timm()
    try:
        model = timm.create_model(name, pretrained=weights is None, num_classes=0)
    except (RuntimeError, OSError, ValueError) as error:
        raise ValueError(
            f"cannot build timm model {name!r}: {error}. Without a network, give the weights as "
            f"timm:{name}@<file.safetensors>"
        ) from error
    if weights is not None:
        load_weights(model, weights)
        spec = f"timm:{name}@{weights}"
    model = model.to(dtype).eval()
    return wrap_model(model, spec, preprocessing(model))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict file into ``model`` (a classifier head in the file is left out: the model has none)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load fails in many ways on other files
            raise ValueError(f"cannot read {path} safely as a state dict (weights_only): {error}") from error
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = {key: tensor for key, tensor in state.items() if not key.startswith("head.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit the timm model: {error}") from error


def preprocessing(model: nn.Module) -> dict:
    """Mean, std and input side from the model's ``pretrained_cfg``, where it has one."""
    config = getattr(model, "pretrained_cfg", None) or {}
    prep = {key: tuple(config[key]) for key in ("mean", "std") if key in config}
    if "input_size" in config:
        prep["image_size"] = int(config["input_size"][-1])
    return prep


SPEC_LOADERS["timm:"] = load_timm
