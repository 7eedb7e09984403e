"""The prompt configuration: every variant of the paper, and the designs beyond it, as one dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import check_fields, option

LOCATIONS = ("prepend", "add", "prepend-pixel", "concat-channel")  # a Transformer's (backbones with tokens)
READOUTS = ("cls", "image", "prompt", "all")
INITS = ("xavier", "normal", "zeros", "tokens", "scaled-tokens")
TOKEN_INITS = ("tokens", "scaled-tokens")  # prompts drawn from the training images by vptune.prototypes
PIXEL_LOCATIONS = ("prepend-pixel", "concat-channel")
CONV_LOCATIONS = ("pad", "below")  # a ConvNet's prompts (prompts.pixels): a border of pixels, extra input channels


@dataclass
class PromptConfig:
    """Where, how many and how prompts enter the frozen backbone (the paper's Sec. 3.2 and its variants, Sec. 4.3).

    ``location`` and ``readout`` left unset are the backbone family's defaults, which :func:`vptune.build` fills in
    (``Backbone.resolve_prompt``): a built model's configuration always names both.
    """

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
    location: str | None = option(
        None,
        "prepend | add | prepend-pixel | concat-channel (Transformers) | pad | below (ConvNets); none: the backbone "
        "family's",
        choices=LOCATIONS + CONV_LOCATIONS,
        shown="the family's: prepend on Transformers, pad on ConvNets",
    )
    readout: str | None = option(
        None,
        "head input: cls token, or the mean of image, prompt or all outputs; none: the backbone family's",
        choices=READOUTS,
        shown="the family's: cls; all on MAE",
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
        """The rules between options; those that need the location wait for it to be set (the family's default)."""
        token_prompts = self.location in (None, "prepend", "prepend-pixel")
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
                _check(
                    self.location in (None, "prepend"),
                    f"{name} applies to prepended prompt tokens (location 'prepend')",
                )
                _check(not self.project, f"{name} works on prompts at the model's width: set project to 0")

    @property
    def resolved(self) -> bool:
        """Whether the family's defaults are filled in (location and read-out named)."""
        return self.location is not None and self.readout is not None

    @property
    def stacks(self) -> bool:
        """Whether several tasks' prompts of this configuration stack into one module (served or trained together):
        a projection, or extra input channels through a widened input layer, are one model's own."""
        return not self.project and self.location not in ("concat-channel", "below")

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


def xavier_bound(patch_size: int, width: int) -> float:
    """The paper's init bound sqrt(6 / (3*s*s + d)) (Xavier-uniform with the patch embedding's fan-in)."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + width))


def xavier_norm(patch_size: int, fan_width: int, width: int) -> float:
    """The root-mean-square norm of a ``width``-wide prompt token drawn uniformly in (-v, v), v the bound for
    ``fan_width``: v * sqrt(width / 3) (0.89 for ViT-S/14's d = 384)."""
    return xavier_bound(patch_size, fan_width) * math.sqrt(width / 3)
