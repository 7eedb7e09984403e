"""Visual prompts: the configuration and the module that inserts them, for every variant of the paper.

Prompt tensors carry a leading task dimension T (1 for a single task), so a batch can pick each sample's
prompts by a task index; that is the path a multi-task model serves many tasks in one batch through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, split_range
from .config import check_fields, option

LOCATIONS = ("prepend", "add", "prepend-pixel", "concat-channel")  # a Transformer's (backbones with tokens)
READOUTS = ("cls", "image", "prompt", "all")
INITS = ("xavier", "normal", "zeros", "tokens", "scaled-tokens")
TOKEN_INITS = ("tokens", "scaled-tokens")  # prompts drawn from the training images by vptune.prototypes
PIXEL_LOCATIONS = ("prepend-pixel", "concat-channel")
CONV_LOCATIONS = ("pad", "below")  # a ConvNet's prompts (vptune.convnet): a border of pixels, extra input channels


class DefaultLocation(str):
    """The location a :class:`PromptConfig` has when none was chosen: ``"prepend"`` (it equals that string and is
    saved as it); a backbone without tokens puts its own default in its place (a ConvNet: ``"pad"``), where a
    location the user chose is kept, and refused if it does not apply."""


DEFAULT_LOCATION = DefaultLocation("prepend")


@dataclass
class PromptConfig:
    """Where, how many and how prompts enter the frozen backbone (VPT.md, "Exact mechanism" and "Variants")."""

    num_tokens: int = option(10, "prompt tokens p per prompted layer; 0 disables prompts")
    deep: bool = option(
        False, "VPT-Deep: fresh prompts at every block, replacing the previous outputs (shallow: block 0 only)"
    )
    layers: list[int] | None = option(
        None, "0-based blocks that get prompts, negative = from the end; CLI: 0,1,2 or first:3 or last:3"
    )
    shared: bool = option(False, "one prompt set reused by every prompted layer")
    dropout: float = option(0.0, "dropout on the prompt tokens (the released configs: 0.1 deep, 0.0 shallow)")
    init: str = option(
        "xavier",
        "xavier = uniform(-v, v), v = sqrt(6/(3*s*s + d)); normal; zeros; tokens = patch tokens that each prompted "
        "block receives on training images, drawn at random (Self-Prompt Tuning; done by fit before training); "
        "scaled-tokens = those tokens, each rescaled to the norm a Xavier prompt has, v*sqrt(d/3)",
        choices=INITS,
    )
    project: int = option(0, "store prompts at width k and map them to d with a trainable Linear(k, d); 0 = off")
    location: str = option(
        DEFAULT_LOCATION,
        "prepend | add | prepend-pixel | concat-channel (Transformers; default prepend) | pad | below (ConvNets; "
        "default pad)",
        choices=LOCATIONS + CONV_LOCATIONS,
    )
    readout: str | None = option(
        None,
        "head input: cls token, or the mean of image, prompt or all outputs; none: the backbone family's (MAE: all)",
        choices=READOUTS,
    )
    drop_after: bool = option(False, "remove the prompt tokens after the last prompted layer")
    kv_tokens: int = option(
        0,
        "key-value prompts (E2VPT): m learnable keys and m values appended to each prompted block's attention keys "
        "and values after their projections; attended to, no outputs; 0 = off",
    )
    fourier: float = option(
        0.0,
        "Fourier prompts (VFPT): the fraction of each prompted block's prompts (the first floor(f*p)) replaced by "
        "the real part of their 2-D FFT over tokens x width before insertion; 0 = off",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        _check(self.num_tokens >= 0, "num_tokens must be an integer >= 0")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.project >= 0, f"project must be >= 0 (0 = off), got {self.project}")
        _check(self.kv_tokens >= 0, f"kv_tokens must be >= 0 (0 = off), got {self.kv_tokens}")
        _check(0.0 <= self.fourier <= 1.0, f"fourier must be a fraction in [0, 1] (0 = off), got {self.fourier}")
        if self.layers is not None:
            self.layers = list(self.layers)
            _check(len(self.layers) > 0, "layers is empty: give at least one block index, or leave it unset")
            _check(len(set(self.layers)) == len(self.layers), f"layers has repeated blocks: {self.layers}")
            self.deep = self.deep or len(self.layers) > 1  # each listed block gets fresh prompts
        self._check_combinations()

    def _check_combinations(self) -> None:
        token_prompts = self.location in ("prepend", "prepend-pixel")
        if self.readout == "prompt":
            _check(token_prompts and self.num_tokens > 0, "readout 'prompt' needs prepended prompt tokens")
            _check(not self.drop_after, "readout 'prompt' cannot read prompts that drop_after removed")
        if self.location in PIXEL_LOCATIONS + CONV_LOCATIONS:
            _check(not self.deep and self.layers in (None, [0]), f"location {self.location!r} prompts the input only")
            _check(self.project == 0, f"location {self.location!r} lives in pixel space: project does not apply")
        if self.location in CONV_LOCATIONS:
            _check(self.dropout == 0, f"location {self.location!r} prompts are pixels: they take no dropout (set 0)")
            _check(self.readout in (None, "cls"), "a ConvNet reads out its pooled features: leave readout unset")
        _check(not self.drop_after or token_prompts, "drop_after applies to prepended prompt tokens only")
        designs = (
            ("kv_tokens", self.kv_tokens > 0),
            ("fourier", self.fourier > 0),
            (f"init {self.init!r}", self.from_tokens),
        )
        for name, used in designs:
            conv = f"location {self.location!r} prompts a ConvNet's pixels: {name} needs a Transformer's tokens"
            _check(not used or self.location not in CONV_LOCATIONS, conv)
            if used and name != "kv_tokens":
                _check(self.location == "prepend", f"{name} applies to prepended prompt tokens (location 'prepend')")
                _check(not self.project, f"{name} works on prompts at the model's width: set project to 0")

    @property
    def from_tokens(self) -> bool:
        """Whether the prompts start as patch tokens of the training images (init ``tokens`` or ``scaled-tokens``)."""
        return self.init in TOKEN_INITS

    @property
    def enabled(self) -> bool:
        """Whether any prompt is inserted (prompt tokens, or key-value prompts alone)."""
        return self.num_tokens > 0 or self.kv_tokens > 0

    @property
    def fourier_tokens(self) -> int:
        """How many of a block's p prompts pass through the FFT: floor(fourier * p), as VFPT counts them."""
        return math.floor(self.fourier * self.num_tokens + 1e-9)

    def prompted_layers(self, depth: int) -> list[int]:
        """The 0-based blocks that receive prompts, for a backbone of ``depth`` blocks."""
        if self.layers is None:
            return list(range(depth)) if self.deep else [0]
        resolved = sorted(layer + depth if layer < 0 else layer for layer in self.layers)
        bad = [layer for layer in self.layers if not -depth <= layer < depth]
        _check(not bad, f"layers {bad} out of range for a backbone of depth {depth} (valid: 0..{depth - 1})")
        _check(
            len(set(resolved)) == len(resolved),
            f"layers {self.layers} has repeated blocks for a backbone of depth {depth} (negative = from the end)",
        )
        return resolved


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"PromptConfig: {message}")


def _set_widths(config: PromptConfig, backbone: Backbone, layers: list[int]) -> list[int]:
    """The width of each stored prompt set: its block's (one set when shared, which needs one width)."""
    widths = [backbone.block_width(layer) for layer in layers]
    if config.shared and len(set(widths)) > 1:
        raise ValueError(
            f"PromptConfig: shared prompts need blocks of one width, but blocks {layers} have widths {widths}: "
            "prompt blocks of one stage, or leave shared off"
        )
    return widths[:1] if config.shared else widths


def xavier_bound(patch_size: int, width: int) -> float:
    """The paper's init bound sqrt(6 / (3*s*s + d)) (Xavier-uniform with the patch embedding's fan-in)."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + width))


def xavier_norm(patch_size: int, fan_width: int, width: int) -> float:
    """The root-mean-square norm of a ``width``-wide prompt token drawn uniformly in (-v, v), v the bound for
    ``fan_width``: v * sqrt(width / 3) (0.89 for ViT-S/14's d = 384)."""
    return xavier_bound(patch_size, fan_width) * math.sqrt(width / 3)


class Prompts(nn.Module):
    """Learnable prompts for one or more tasks, inserted into a frozen :class:`Backbone`.

    ``embeddings`` has shape (T, S, n, k): T tasks, S prompt sets (1 when shared, else one per prompted
    layer), n tokens (p for prepend; every token for add; C*s*s pixels per patch for prepend-pixel; H*W for
    concat-channel), k the stored width. On a backbone whose blocks differ in width (Swin) the sets lie side by
    side instead, each at its block's width: (T, 1, n, sum of the widths). ``embeddings`` given: those values (T
    tasks' prompts, e.g. stacked from several models), else T = ``num_tasks`` sets initialised as the paper does.
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
        if config.location in CONV_LOCATIONS:
            raise ValueError(
                f"location {config.location!r} prompts a ConvNet's pixels; {backbone.family} is a Transformer: use "
                "prepend (the default), add, prepend-pixel or concat-channel"
            )
        backbone.check_prompt(config)
        self.config = config
        self.layers = config.prompted_layers(backbone.depth)
        self.widths = _set_widths(config, backbone, self.layers)
        self.side_by_side = any(width != backbone.width for width in self.widths)
        self.image_size = image_size
        self.num_prefix = backbone.num_prefix_tokens
        self.patch_size = backbone.patch_size
        sets = 1 if config.shared or self.side_by_side else len(self.layers)
        given = embeddings is not None
        shape = (num_tasks, sets, *self._shape(backbone))
        self.embeddings = nn.Parameter(embeddings.detach().clone() if given else torch.empty(shape))
        num_tasks = self.embeddings.shape[0]
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
        self.tokens_pending = config.from_tokens and not given  # see init_from_tokens
        if not given:
            self.reset_parameters(backbone, generator)

    @property
    def task_tensors(self) -> list[str]:
        """The names of the tensors that hold one row per task (stacked and unstacked by :mod:`vptune.stacking`)."""
        return ["embeddings"] + (["kv_keys", "kv_values"] if self.kv_keys is not None else [])

    def _shape(self, backbone: Backbone) -> tuple[int, int]:
        location, width = self.config.location, self.config.project or backbone.width
        if location == "add":
            return backbone.num_prefix_tokens + backbone.num_patches(self.image_size), width
        if location == "prepend-pixel":
            return self.config.num_tokens, backbone.in_chans * self.patch_size**2
        if location == "concat-channel":
            return self.config.num_tokens, self.image_size**2
        return self.config.num_tokens, sum(self.widths) if self.side_by_side else width

    def reset_parameters(self, backbone: Backbone, generator: torch.Generator | None = None) -> None:
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

    def _draw(self, tensor: torch.Tensor, width: int, backbone: Backbone, generator: torch.Generator | None) -> None:
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

    @property
    def num_tasks(self) -> int:
        return self.embeddings.shape[0]

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
        return stored[:1] if task_ids is None else stored[task_ids]

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

    def tokens(self, layer: int, task_ids: torch.Tensor | None, backbone: Backbone, batch: int) -> torch.Tensor:
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
        kernel = self.channel_kernel if task_ids is None else self.channel_kernel[task_ids]
        patches = F.unfold(channels.to(pixel_values.dtype), self.patch_size, stride=self.patch_size)
        return torch.einsum("bkn,bdk->bnd", patches, kernel[: patches.shape[0]].to(patches.dtype))

    def _check_size(self, pixel_values: torch.Tensor) -> None:
        size = tuple(pixel_values.shape[-2:])
        if size != (self.image_size, self.image_size):
            raise ValueError(
                f"{self.config.location!r} prompts were built for {self.image_size}x{self.image_size} input, "
                f"got {size[0]}x{size[1]}: resize the images or rebuild with image_size={size[0]}"
            )

    def apply(
        self,
        layer: int,
        hidden: torch.Tensor,
        num_prompts: int,
        task_ids: torch.Tensor | None,
        backbone: Backbone,
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


def fourier(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """VFPT's Fourier prompts: the first ``count`` tokens of (.., n, d) replaced by the real part of their 2-D FFT
    over tokens x width (``Re(FFT_tokens(FFT_width(P)))``), the rest unchanged; computed in float32."""
    if not count:
        return tokens
    transformed = torch.fft.fft2(tokens[..., :count, :].float(), dim=(-2, -1)).real.to(tokens.dtype)
    return transformed if count == tokens.shape[-2] else torch.cat([transformed, tokens[..., count:, :]], dim=-2)
