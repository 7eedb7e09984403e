"""Tuning methods by name: one small builder each, registered with its defaults; ``build`` is the one entry point.

Every method returns a :class:`TaskModel`. What trains is what has ``requires_grad``; a task file stores exactly
that. Methods that change the backbone's weights or computation work on :func:`own_backbone`, never on the
backbone they were given.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .backbones import Backbone
from .config import option
from .model import TaskModel
from .modules import Adapter, AdapterAfter, LoraLinear, MlpHead, SideNetwork, own_backbone, set_submodule
from .prompts import PromptConfig

# The paper's grids (VPT.md, "Training protocol"): base lr for SGD methods and for AdamW (full), weight decay.
SGD_LR_GRID = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
ADAMW_LR_GRID = (0.005, 0.001, 0.0005, 0.0001)
WD_GRID = (0.01, 0.001, 0.0001, 0.0)


@dataclass
class MethodOptions:
    """Options of the baselines that have some; each method accepts only its own (``Method.options``)."""

    reduction: int = option(8, "adapter: bottleneck reduction r (d -> d/r -> d)")
    rank: int = option(8, "lora: rank of the update")
    alpha: float = option(8.0, "lora: the update is scaled by alpha / rank")
    lora_targets: str = option("q,v", "lora: attention projections to adapt, from q,k,v,o")
    side_width: int = option(16, "sidetune: channels of the side network's first conv (doubling per conv)")
    side_depth: int = option(4, "sidetune: stride-2 convs in the side network")


Builder = Callable[..., TaskModel]


@dataclass(frozen=True)
class Method:
    """A registered tuning method.

    Attributes:
        name: the registry name; ``<k>`` in it (``mlp-<k>``) stands for a positive integer given by the user.
        builder: ``builder(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel``.
        summary: one line for ``--help`` and tables.
        optimizer: ``sgd`` or ``adamw``, used when the training config says ``auto``.
        base_lr: default base learning rate (the actual lr is base_lr * batch / 256).
        lr_grid, wd_grid: the paper's search grid for this method.
        options: the :class:`MethodOptions` fields it accepts.
        prompted: it takes a :class:`PromptConfig`.
    """

    name: str
    builder: Builder
    summary: str
    optimizer: str = "sgd"
    base_lr: float = 0.1
    lr_grid: tuple[float, ...] = SGD_LR_GRID
    wd_grid: tuple[float, ...] = WD_GRID
    options: tuple[str, ...] = ()
    prompted: bool = False


METHODS: dict[str, Method] = {}


def register(name: str, summary: str, **settings) -> Callable[[Builder], Builder]:
    """Register ``builder(backbone, num_classes, prompt, image_size, generator, options, k)`` under ``name``."""

    def decorate(builder: Builder) -> Builder:
        METHODS[name] = Method(name, builder, summary, **settings)
        return builder

    return decorate


def get_method(name: str) -> tuple[Method, int | None]:
    """The method for a name such as ``"vpt-deep"`` or ``"mlp-3"`` (then k = 3)."""
    if name in METHODS:
        return METHODS[name], None
    match = re.fullmatch(r"(.+)-(\d+)", name)
    if match and f"{match[1]}-<k>" in METHODS and int(match[2]) >= 1:
        return METHODS[f"{match[1]}-<k>"], int(match[2])
    raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())} (<k> a positive integer)")


def method_names() -> list[str]:
    """Registered names, ``<k>`` templates included."""
    return sorted(METHODS)


def build(
    method: str,
    backbone: Backbone,
    num_classes: int,
    prompt: PromptConfig | None = None,
    image_size: int | None = None,
    seed: int = 0,
    **options,
) -> TaskModel:
    """Build a model for one task with a tuning method.

    Args:
        method: a registered name (:func:`method_names`): ``"vpt-deep"``, ``"linear"``, ``"mlp-3"``, ``"lora"`` ...
        backbone: a frozen backbone from :func:`vptune.load_backbone`; never modified.
        num_classes: classes C of the task.
        prompt: the prompt configuration (VPT methods); the method sets ``deep``.
        image_size: the square input side; default the backbone's native size. A multiple of the patch size.
        seed: seeds the initialisation of everything that trains.
        **options: the method's :class:`MethodOptions` (e.g. ``reduction=8`` for ``adapter``).
    """
    spec, k = get_method(method)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    image_size = image_size or backbone.image_size
    if image_size % backbone.patch_size:
        fit = (image_size // backbone.patch_size) * backbone.patch_size or backbone.patch_size
        raise ValueError(
            f"image_size {image_size} is not a multiple of the patch size {backbone.patch_size}: use e.g. {fit}"
        )
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        accepted = ", ".join(spec.options) or "none"
        raise ValueError(f"method {method!r} does not take options {unknown}; it takes: {accepted}")
    values = MethodOptions(**options)
    generator = torch.Generator().manual_seed(seed)
    model = spec.builder(backbone, num_classes, prompt, image_size, generator, values, k)
    model.method = method
    model.options = {name: getattr(values, name) for name in spec.options}
    return model


def prompt_defaults(method: str) -> dict:
    """Prompt options a method starts from (the released configs: dropout 0.1 for deep prompts)."""
    if method.startswith("vpt-deep"):
        return {"num_tokens": 10, "dropout": 0.1}
    if method == "vpt-shallow":
        return {"num_tokens": 10, "dropout": 0.0}
    return {"num_tokens": 0}


# --- VPT ------------------------------------------------------------------------------------------
def _prompt_model(backbone, num_classes, prompt, image_size, generator, deep: bool) -> TaskModel:
    prompt = prompt or PromptConfig(**prompt_defaults("vpt-deep" if deep else "vpt-shallow"))
    if not deep and prompt.layers is not None and len(prompt.layers) > 1:
        raise ValueError("vpt-shallow prompts one block: give at most one layer, or use vpt-deep")
    return TaskModel(backbone, num_classes, dataclasses.replace(prompt, deep=deep), image_size, generator)


@register("vpt-shallow", "prompts before the first block (VPT-Shallow)", prompted=True)
def _vpt_shallow(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    return _prompt_model(backbone, num_classes, prompt, image_size, generator, deep=False)


@register("vpt-deep", "fresh prompts before every block (VPT-Deep)", prompted=True)
def _vpt_deep(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    return _prompt_model(backbone, num_classes, prompt, image_size, generator, deep=True)


@register("vpt-deep+bias", "VPT-Deep prompts plus every bias term of the backbone", prompted=True)
def _vpt_deep_bias(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    return _prompt_model(_bias_backbone(backbone), num_classes, prompt, image_size, generator, deep=True)


# --- head-only baselines --------------------------------------------------------------------------
def _plain(backbone, num_classes, prompt, image_size, generator) -> TaskModel:
    readout = prompt.readout if prompt is not None else "cls"
    return TaskModel(backbone, num_classes, PromptConfig(num_tokens=0, readout=readout), image_size, generator)


@register("linear", "frozen backbone, linear head")
def _linear(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    return _plain(backbone, num_classes, prompt, image_size, generator)


@register("mlp-<k>", "frozen backbone, k-layer MLP head (k-1 hidden layers of width d, ReLU)")
def _mlp(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    model = _plain(backbone, num_classes, prompt, image_size, None)
    model.head = MlpHead(backbone.width, num_classes, k, generator=generator)
    return model


@register(
    "sidetune", "frozen backbone blended with a small side network on the pixels", options=("side_width", "side_depth")
)
def _sidetune(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    side = SideNetwork(backbone.in_chans, backbone.width, options.side_width, options.side_depth, generator)
    prompt = PromptConfig(num_tokens=0, readout=prompt.readout if prompt is not None else "cls")
    return SideTuneModel(backbone, num_classes, prompt, image_size, generator, side)


class SideTuneModel(TaskModel):
    """Features ``a * backbone + (1 - a) * side`` with ``a = sigmoid(blend)``, ``blend`` starting at 0 (a = 0.5)."""

    def __init__(self, backbone, num_classes, prompt, image_size, generator, side: SideNetwork):
        super().__init__(backbone, num_classes, prompt, image_size, generator)
        self.side = side
        self.blend = nn.Parameter(torch.zeros(()))

    def forward_features(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        alpha = torch.sigmoid(self.blend)
        return alpha * super().forward_features(pixel_values, task_ids) + (1 - alpha) * self.side(pixel_values)

    def cache_point(self) -> int:
        return 0  # the side network reads the pixels


# --- baselines that train backbone weights --------------------------------------------------------
@register("full", "every backbone weight trains (AdamW)", optimizer="adamw", base_lr=0.0005, lr_grid=ADAMW_LR_GRID)
def _full(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    # DINOv2's mask token serves masked pretraining only: no forward pass uses it, so it stays frozen
    trains = lambda name: not name.endswith("mask_token")  # noqa: E731
    return _plain(own_backbone(backbone, trains), num_classes, prompt, image_size, generator)


@register("partial-<k>", "the last k blocks and the final norm train")
def _partial(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    if k > backbone.depth:
        raise ValueError(f"partial-{k}: the backbone has only {backbone.depth} blocks")
    names = _block_names(backbone, range(backbone.depth - k, backbone.depth)) | _module_names(backbone, backbone.norm)
    return _plain(own_backbone(backbone, names.__contains__), num_classes, prompt, image_size, generator)


@register("bias", "only the backbone's bias terms (and the head) train (BitFit)")
def _bias(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    return _plain(_bias_backbone(backbone), num_classes, prompt, image_size, generator)


def _bias_backbone(backbone: Backbone) -> Backbone:
    return own_backbone(backbone, lambda name: name.endswith(".bias"))


@register("adapter", "bottleneck adapter after every block's MLP (starts as the identity)", options=("reduction",))
def _adapter(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    copy = own_backbone(backbone)
    for index in range(copy.depth):
        linear = copy.mlp_output(index)
        adapter = Adapter(copy.width, options.reduction, generator)
        set_submodule(copy.blocks[index], linear, AdapterAfter(linear, adapter))
    return _plain(copy, num_classes, prompt, image_size, generator)


@register(
    "lora", "low-rank updates of attention projections (Hu et al. 2021)", options=("rank", "alpha", "lora_targets")
)
def _lora(backbone, num_classes, prompt, image_size, generator, options, k) -> TaskModel:
    targets = [t.strip() for t in options.lora_targets.split(",") if t.strip()]
    if not targets or set(targets) - {"q", "k", "v", "o"}:
        raise ValueError(f"lora_targets must list some of q,k,v,o, got {options.lora_targets!r}")
    copy = own_backbone(backbone)
    for index in range(copy.depth):
        projections = copy.attention_projections(index)
        for role in targets:
            lora = LoraLinear(projections[role], options.rank, options.alpha, generator)
            set_submodule(copy.blocks[index], projections[role], lora)
    return _plain(copy, num_classes, prompt, image_size, generator)


def _block_names(backbone: Backbone, indices) -> set[str]:
    names: set[str] = set()
    for index in indices:
        names |= _module_names(backbone, backbone.blocks[index])
    return names


def _module_names(backbone: Backbone, module: nn.Module) -> set[str]:
    """``named_parameters()`` names (relative to ``backbone``) of ``module``'s parameters."""
    ids = {id(p) for p in module.parameters()}
    return {name for name, p in backbone.named_parameters() if id(p) in ids}
