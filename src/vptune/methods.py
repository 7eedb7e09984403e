"""Tuning methods by name: each is a small builder registered here; ``build`` is the one entry point."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .backbones import Backbone
from .model import TaskModel
from .prompts import PromptConfig

Builder = Callable[..., TaskModel]
METHODS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Register a builder ``fn(backbone, num_classes, prompt, image_size, generator, **options) -> TaskModel``."""

    def decorate(fn: Builder) -> Builder:
        METHODS[name] = fn
        return fn

    return decorate


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
        method: a registered name: ``"vpt-shallow"``, ``"vpt-deep"``, ``"linear"``.
        backbone: a frozen backbone from :func:`vptune.load_backbone`.
        num_classes: classes C of the task.
        prompt: the prompt configuration (VPT methods); the method sets ``deep``.
        image_size: the square input side; default the backbone's native size. A multiple of the patch size.
        seed: seeds the initialisation of prompts and head.
        **options: method-specific options.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    image_size = image_size or backbone.image_size
    if image_size % backbone.patch_size:
        fit = (image_size // backbone.patch_size) * backbone.patch_size or backbone.patch_size
        raise ValueError(
            f"image_size {image_size} is not a multiple of the patch size {backbone.patch_size}: use e.g. {fit}"
        )
    generator = torch.Generator().manual_seed(seed)
    model = METHODS[method](backbone, num_classes, prompt, image_size, generator, **options)
    model.method = method
    return model


def prompt_defaults(method: str) -> dict:
    """Prompt options a method starts from (the released configs: dropout 0.1 for deep prompts)."""
    if method == "vpt-deep":
        return {"num_tokens": 10, "dropout": 0.1}
    if method == "vpt-shallow":
        return {"num_tokens": 10, "dropout": 0.0}
    return {"num_tokens": 0}


def _vpt(deep: bool) -> Builder:
    def builder(backbone, num_classes, prompt, image_size, generator, **options) -> TaskModel:
        _no_options(options)
        prompt = prompt or PromptConfig(**prompt_defaults("vpt-deep" if deep else "vpt-shallow"))
        if not deep and prompt.layers is not None and len(prompt.layers) > 1:
            raise ValueError("vpt-shallow prompts one block: give at most one layer, or use vpt-deep")
        prompt = dataclasses.replace(prompt, deep=deep)
        return TaskModel(backbone, num_classes, prompt, image_size, generator)

    return builder


register("vpt-shallow")(_vpt(deep=False))
register("vpt-deep")(_vpt(deep=True))


@register("linear")
def _linear(backbone, num_classes, prompt, image_size, generator, **options) -> TaskModel:
    _no_options(options)
    readout = prompt.readout if prompt is not None else "cls"
    return TaskModel(backbone, num_classes, PromptConfig(num_tokens=0, readout=readout), image_size, generator)


def _no_options(options: dict) -> None:
    if options:
        raise ValueError(f"unexpected options {sorted(options)} for this method")
