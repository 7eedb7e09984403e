"""The method registry: a :class:`Method` carries everything the rest of vptune asks of a tuning method (its
defaults, its options, its traits), and :func:`build` is the one way to make a model with it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..backbones import Backbone
from ..config import to_dict
from ..convnet import ConvTaskModel
from ..head import HEAD_INITS, HEAD_NORMS
from ..model import TaskModel
from ..preprocessing import Preprocessing
from ..prompts import PromptConfig

# The paper's grids (VPT.md, "Training protocol"): base lr for SGD methods and for AdamW (full), weight decay.
SGD_LR_GRID = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
ADAMW_LR_GRID = (0.005, 0.001, 0.0005, 0.0001)
WD_GRID = (0.01, 0.001, 0.0001, 0.0)
DEMO_SCHEDULE = {"epochs": 4, "warmup_epochs": 1}  # a short CPU schedule for `vptune demo`


@dataclass(frozen=True)
class BuildContext:
    """What a builder gets: the request of :func:`build`, resolved.

    Attributes:
        method: the :class:`Method` being built.
        name: the name asked for (``"mlp-3"`` for the ``mlp-<k>`` method).
        backbone: the shared frozen backbone (never modify it: use ``backbone.own_copy``).
        num_classes: classes C.
        prompt: the prompt configuration asked for, or None (the method's defaults).
        preprocessing: the model's preprocessing.
        generator: seeds every initial value the model draws.
        options: the method's options dataclass instance (None when it has none).
        k: the ``<k>`` of a templated name (``mlp-3``: 3), else None.
        classes: class names, or None.
        head_init: how a new linear head starts (:data:`vptune.head.HEAD_INITS`).
        head_norm: what the head does to the features first (:data:`vptune.head.HEAD_NORMS`).
    """

    method: Method
    name: str
    backbone: Backbone
    num_classes: int
    prompt: PromptConfig | None
    preprocessing: Preprocessing
    generator: torch.Generator
    options: Any
    k: int | None
    classes: list[str] | None
    head_init: str = "uniform"
    head_norm: str = "batchnorm"

    @property
    def readout(self) -> str | None:
        """The read-out asked for (None: the backbone family's default)."""
        return self.prompt.readout if self.prompt is not None else None

    def model(
        self,
        prompt: PromptConfig | None = None,
        *,
        backbone: Backbone | None = None,
        head: nn.Module | None = None,
        model_class: type[TaskModel] | None = None,
        **extra: Any,
    ) -> TaskModel:
        """The task model: ``prompt`` (default none, with the read-out asked for) on ``backbone`` (default: shared);
        ``model_class`` defaults to :class:`TaskModel`, or :class:`~vptune.convnet.ConvTaskModel` on a ConvNet."""
        backbone = backbone or self.backbone
        if model_class is None:
            model_class = TaskModel if backbone.has_tokens else ConvTaskModel
        return model_class(
            backbone,
            self.num_classes,
            prompt or PromptConfig(num_tokens=0, readout=self.readout),
            self.preprocessing,
            method=self.name,
            options=to_dict(self.options) if self.options is not None else {},
            classes=self.classes,
            head=head,
            generator=self.generator,
            head_init=self.head_init,
            head_norm=self.head_norm,
            **extra,
        )


Builder = Callable[[BuildContext], TaskModel]


@dataclass(frozen=True, eq=False)
class Method:
    """A registered tuning method and everything vptune asks of it.

    Attributes:
        name: the registry name; ``<k>`` in it (``mlp-<k>``) stands for a positive integer given by the user.
        builder: ``builder(context) -> TaskModel``.
        summary: one line for ``--help`` and tables.
        optimizer: ``sgd`` or ``adamw``, used when the training config says ``auto``.
        base_lr: default base learning rate (the actual lr is base_lr * batch / 256).
        lr_grid, wd_grid: the paper's search grid for this method.
        options: its options dataclass (fields with help, validated on construction), or None.
        prompt: the prompt options it starts from (the released configs); None: it takes no prompts.
        head_only: only a head trains (a budget may give it its own, cheaper lr grid).
        servable: one shared, unmodified backbone serves it (:class:`~vptune.MultiTask`, ``vptune serve``).
        batchable: several configurations train in one pass (:func:`vptune.batched.fit_batched`).
        perf_rows: the performance harness's rows for it, as suffixes of its name (``""``: the plain row).
        demo: its training schedule in ``vptune demo``.
        demo_rank: its place among the demo's default methods (None: not one of them).
        convnets: it works on a backbone without tokens (a ConvNet); other methods are refused there.
    """

    name: str
    builder: Builder
    summary: str
    optimizer: str = "sgd"
    base_lr: float = 0.1
    lr_grid: tuple[float, ...] = SGD_LR_GRID
    wd_grid: tuple[float, ...] = WD_GRID
    options: type | None = None
    prompt: dict | None = None
    head_only: bool = False
    servable: bool = False
    batchable: bool = False
    perf_rows: tuple[str, ...] = ()
    demo: dict = field(default_factory=lambda: dict(DEMO_SCHEDULE))
    demo_rank: int | None = None
    convnets: bool = False

    @property
    def prompted(self) -> bool:
        """Whether it takes a :class:`PromptConfig`."""
        return self.prompt is not None

    @property
    def option_names(self) -> list[str]:
        """The names of its options."""
        return [f.name for f in dataclasses.fields(self.options)] if self.options is not None else []

    def make_options(self, values: dict | None = None) -> Any:
        """Its options dataclass from keyword values, refusing options it does not take; None when it has none."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.option_names))
        if unknown:
            accepted = ", ".join(self.option_names) or "none"
            raise ValueError(f"method {self.name!r} does not take options {unknown}; it takes: {accepted}")
        return self.options(**values) if self.options is not None else None

    def prompt_config(self, **overrides: Any) -> PromptConfig | None:
        """Its starting prompt configuration, with ``overrides``; None when it takes no prompts."""
        return PromptConfig(**{**self.prompt, **overrides}) if self.prompt is not None else None


METHODS: dict[str, Method] = {}


def register(name: str, summary: str, **traits: Any) -> Callable[[Builder], Builder]:
    """Register ``builder(context) -> TaskModel`` as the method ``name`` with its traits (see :class:`Method`)."""

    def decorate(builder: Builder) -> Builder:
        if name in METHODS:
            raise ValueError(f"a method named {name!r} is already registered")
        METHODS[name] = Method(name, builder, summary, **traits)
        return builder

    return decorate


def unregister(name: str) -> None:
    """Remove a registered method (tests register and remove their own)."""
    METHODS.pop(name, None)


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
    num_classes: int | None = None,
    prompt: PromptConfig | None = None,
    image_size: int | None = None,
    seed: int = 0,
    *,
    classes: list[str] | None = None,
    protocol: str = "vtab",
    preprocessing: Preprocessing | None = None,
    head_init: str = "uniform",
    head_norm: str = "batchnorm",
    **options: Any,
) -> TaskModel:
    """Build a model for one task with a tuning method.

    Args:
        method: a registered name (:func:`method_names`): ``"vpt-deep"``, ``"linear"``, ``"mlp-3"``, ``"lora"`` ...
        backbone: a frozen backbone from :func:`vptune.load_backbone`; never modified.
        num_classes: classes C (default: the number of ``classes``).
        prompt: the prompt configuration (prompted methods; default the method's); the method sets ``deep``.
        image_size: the square input side; default the backbone's native size. A multiple of the patch size.
        seed: seeds the initialisation of everything that trains.
        classes: class names, index = label.
        protocol: ``"vtab"`` (square resize) or ``"fgvc"`` (resize, crop; random crops and flips to train);
            :attr:`vptune.data.TaskData.protocol` says which a task uses.
        preprocessing: the whole :class:`Preprocessing` instead of ``image_size`` and ``protocol``.
        head_init: ``"uniform"`` (nn.Linear's range, the default) or ``"released"`` (the released code's kaiming
            fan-out weight and -log(99) bias); see docs/fidelity.md.
        head_norm: ``"batchnorm"`` (a batch norm without affine on the features the head reads, the default) or
            ``"none"`` (the paper); see docs/fidelity.md.
        **options: the method's options (e.g. ``reduction=8`` for ``adapter``; :attr:`Method.options`).
    """
    spec, k = get_method(method)
    _check_family(spec, backbone)
    for name, value, choices in (("head_init", head_init, HEAD_INITS), ("head_norm", head_norm, HEAD_NORMS)):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    num_classes = num_classes if num_classes is not None else len(classes or [])
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    preprocessing = preprocessing or Preprocessing(
        image_size or backbone.image_size, backbone.mean, backbone.std, protocol
    )
    _check_patch_size(preprocessing.image_size, backbone.patch_size)
    context = BuildContext(
        spec, method, backbone, num_classes, prompt, preprocessing, torch.Generator().manual_seed(seed),
        spec.make_options(options), k, classes, head_init, head_norm,
    )  # fmt: skip
    return spec.builder(context)


def _check_family(method: Method, backbone: Backbone) -> None:
    if backbone.has_tokens or method.convnets:
        return
    usable = ", ".join(name for name, registered in METHODS.items() if registered.convnets)
    raise ValueError(
        f"method {method.name!r} ({method.summary}) works on a Transformer's tokens and blocks; a ConvNet "
        f"({backbone.family}) has no tokens: use one of {usable} (prompts: vpt-shallow with --location pad or below)"
    )


def _check_patch_size(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        fit = (image_size // patch_size) * patch_size or patch_size
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}: use e.g. {fit}")
