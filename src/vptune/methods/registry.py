"""The method registry: a :class:`Method` carries everything the rest of vptune asks of a tuning method (its
defaults, its options, its traits), and :func:`build` is the one way to make a model with it.

Methods are the paper's (and a user's). A named recipe, such as ``vpt-deep+kv`` for VPT-Deep with key-value prompts,
is an alias (:func:`register_alias`): it expands to a method and prompt options, and a model built from it records
the method, the options in its prompt configuration.
"""

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
from ..head import HEAD_INIT, HEAD_NORM, check_head
from ..model import TaskModel
from ..preprocessing import Preprocessing
from ..prompts import PromptConfig

# The paper's grids (its Sec. 4.1 and supplementary): base lr for SGD methods and for AdamW (full), weight decay.
SGD_LR_GRID = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
ADAMW_LR_GRID = (0.005, 0.001, 0.0005, 0.0001)
WD_GRID = (0.01, 0.001, 0.0001, 0.0)
DEMO_SCHEDULE = {"epochs": 4, "warmup_epochs": 1}  # a short CPU schedule for `vptune demo`


@dataclass(frozen=True)
class BuildContext:
    """What a builder gets: the request of :func:`build`, resolved.

    Attributes:
        method: the :class:`Method` being built.
        name: the method's name (``"mlp-3"`` for the ``mlp-<k>`` method).
        backbone: the shared frozen backbone (never modify it: use ``backbone.own_copy``).
        num_classes: classes C.
        prompt: the prompt configuration, resolved: the one asked for or the method's, its depth set by the method,
            the family's defaults filled in; for a method without prompts, none inserted (``num_tokens=0``) and the
            read-out asked for.
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
    prompt: PromptConfig
    preprocessing: Preprocessing
    generator: torch.Generator
    options: Any
    k: int | None
    classes: list[str] | None
    head_init: str = HEAD_INIT
    head_norm: str = HEAD_NORM

    def model(
        self,
        prompt: PromptConfig | None = None,
        *,
        backbone: Backbone | None = None,
        head: nn.Module | None = None,
        model_class: type[TaskModel] = TaskModel,
        **extra: Any,
    ) -> TaskModel:
        """The task model: ``prompt`` (default :attr:`prompt`) on ``backbone`` (default: the shared one), the
        prompt's unset options the family's (``Backbone.resolve_prompt``)."""
        backbone = backbone or self.backbone
        return model_class(
            backbone,
            self.num_classes,
            backbone.resolve_prompt(prompt or self.prompt),
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
        optimizer: ``sgd`` or ``adamw``, used when the training config leaves it unset.
        base_lr: default base learning rate (the actual lr is base_lr * batch / 256).
        lr_grid, wd_grid: the paper's search grid for this method.
        options: its options dataclass (fields with help, validated on construction), or None.
        prompt: the prompt options it starts from (the released configs); None: it takes no prompts.
        deep: the prompts' depth it sets whatever the configuration asks (VPT-Deep True, VPT-Shallow False; a
            shallow method takes at most one prompted layer); None: as asked.
        head_only: only a head trains (a budget may give it its own, cheaper lr grid).
        servable: one shared, unmodified backbone serves it (:class:`~vptune.MultiTask`, ``vptune serve``).
        batchable: several configurations train in one pass (:func:`vptune.batched.fit_batched`).
        perf_rows: the performance harness's rows for it, as suffixes of its name (``""``: the plain row).
        demo: its training schedule in ``vptune demo``.
        demo_rank: its place among the demo's default methods (None: not one of them).
        needs: what it needs of a backbone's blocks (``Backbone.capabilities``): ``"tokens"``, a Transformer's token
            sequence (the default); ``()``: it works on any backbone, a ConvNet's too.
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
    deep: bool | None = None
    head_only: bool = False
    servable: bool = False
    batchable: bool = False
    perf_rows: tuple[str, ...] = ()
    demo: dict = field(default_factory=lambda: dict(DEMO_SCHEDULE))
    demo_rank: int | None = None
    needs: tuple[str, ...] = ("tokens",)

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

    def prompt_for(self, prompt: PromptConfig | None) -> PromptConfig:
        """The prompt configuration a model of it is built with: ``prompt`` (default: its own) at its depth; for a
        method without prompts, none inserted, with the read-out asked for (its only option that applies)."""
        if not self.prompted:
            return PromptConfig(num_tokens=0, readout=prompt.readout if prompt is not None else None)
        prompt = prompt or self.prompt_config()
        if self.deep is False and prompt.layers is not None and len(prompt.layers) > 1:
            raise ValueError(f"{self.name} prompts one block: give at most one layer, or use vpt-deep")
        return prompt if self.deep is None else dataclasses.replace(prompt, deep=self.deep)


METHODS: dict[str, Method] = {}
# Named recipes: alias -> (the method, its prompt options over the method's, one line for help)
ALIASES: dict[str, tuple[str, dict, str]] = {}


def register(name: str, summary: str, **traits: Any) -> Callable[[Builder], Builder]:
    """Register ``builder(context) -> TaskModel`` as the method ``name`` with its traits (see :class:`Method`)."""

    def decorate(builder: Builder) -> Builder:
        if name in METHODS or name in ALIASES:
            raise ValueError(f"a method named {name!r} is already registered")
        METHODS[name] = Method(name, builder, summary, **traits)
        return builder

    return decorate


def register_alias(name: str, method: str, prompt: dict, summary: str) -> None:
    """Make ``name`` stand for ``method`` with the prompt options ``prompt`` (over the method's own)."""
    if name in METHODS or name in ALIASES:
        raise ValueError(f"a method named {name!r} is already registered")
    if not get_method(method)[0].prompted:
        raise ValueError(f"alias {name!r}: method {method!r} takes no prompts to set")
    ALIASES[name] = (method, dict(prompt), summary)


def unregister(name: str) -> None:
    """Remove a registered method or alias (tests register and remove their own)."""
    METHODS.pop(name, None)
    ALIASES.pop(name, None)


def get_method(name: str) -> tuple[Method, int | None]:
    """The method for a name such as ``"vpt-deep"``, ``"mlp-3"`` (the ``mlp-<k>`` method; then k = 3) or an alias
    such as ``"vpt-deep+kv"`` (the method it stands for, its prompt options among the method's defaults)."""
    if name in METHODS:
        return METHODS[name], None
    if name in ALIASES:
        method, prompt, _ = ALIASES[name]
        base, k = get_method(method)
        return dataclasses.replace(base, prompt={**base.prompt, **prompt}), k
    match = re.fullmatch(r"(.+)-(\d+)", name)
    if match and f"{match[1]}-<k>" in METHODS and int(match[2]) >= 1:
        return METHODS[f"{match[1]}-<k>"], int(match[2])
    raise ValueError(
        f"unknown method {name!r}; methods: {', '.join(method_names())} (<k> a positive integer); named recipes: "
        f"{', '.join(ALIASES) or 'none'}"
    )


def canonical_name(name: str) -> str:
    """The method a name stands for as a model records it: ``vpt-deep+kv`` -> ``vpt-deep``, ``mlp-3`` itself."""
    get_method(name)  # an unknown name fails here
    return ALIASES[name][0] if name in ALIASES else name


def method_names() -> list[str]:
    """Registered method names, ``<k>`` templates included (named recipes: :data:`ALIASES`)."""
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
    head_init: str = HEAD_INIT,
    head_norm: str = HEAD_NORM,
    **options: Any,
) -> TaskModel:
    """Build a model for one task with a tuning method.

    Args:
        method: a registered name (:func:`method_names`): ``"vpt-deep"``, ``"linear"``, ``"mlp-3"``, ``"lora"`` ...,
            or a named recipe (``"vpt-deep+kv"``: VPT-Deep with key-value prompts; the model records ``vpt-deep``).
        backbone: a frozen backbone from :func:`vptune.load_backbone`; never modified.
        num_classes: classes C (default: the number of ``classes``).
        prompt: the prompt configuration (prompted methods; default the method's); the method sets ``deep``, the
            backbone's family fills in what it leaves unset (``location``, ``readout``).
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
    _check_capabilities(spec, backbone)
    check_head(head_init, head_norm)
    num_classes = num_classes if num_classes is not None else len(classes or [])
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    preprocessing = preprocessing or Preprocessing(
        image_size or backbone.image_size, backbone.mean, backbone.std, protocol
    )
    _check_patch_size(preprocessing.image_size, backbone.patch_size)
    context = BuildContext(
        spec, canonical_name(method), backbone, num_classes, backbone.resolve_prompt(spec.prompt_for(prompt)),
        preprocessing, torch.Generator().manual_seed(seed), spec.make_options(options), k, classes, head_init,
        head_norm,
    )  # fmt: skip
    return spec.builder(context)


def _check_capabilities(method: Method, backbone: Backbone) -> None:
    missing = sorted(set(method.needs) - backbone.capabilities)
    if not missing:
        return
    usable = ", ".join(name for name, each in METHODS.items() if set(each.needs) <= backbone.capabilities)
    raise ValueError(
        f"method {method.name!r} ({method.summary}) works on a Transformer's {' and '.join(missing)} and blocks; "
        f"{backbone.kind} ({backbone.family}) has no {' and '.join(missing)}: use one of {usable}{backbone.prompt_hint}"
    )


def _check_patch_size(image_size: int, patch_size: int) -> None:
    if image_size % patch_size:
        fit = (image_size // patch_size) * patch_size or patch_size
        raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch_size}: use e.g. {fit}")
