"""Tuning methods by name: one module per method family, each registering its builders and traits; :func:`build`
is the one entry point.

Every method returns a :class:`~vptune.TaskModel`. What trains is what has ``requires_grad``; a task file stores
exactly that. Methods that change the backbone's weights or computation work on ``backbone.own_copy(...)``, never
on the backbone they were given. Adding a method is adding a module here (or anywhere: :func:`register` works
from user code too).
"""

from . import adapter, finetune, heads, lora, sidetune, vpt  # noqa: F401  (each registers its methods)
from .adapter import Adapter, AdapterOptions
from .heads import MlpHead
from .lora import LoraLinear, LoraOptions
from .registry import (
    ADAMW_LR_GRID,
    ALIASES,
    METHODS,
    SGD_LR_GRID,
    WD_GRID,
    BuildContext,
    Method,
    build,
    canonical_name,
    get_method,
    method_names,
    register,
    register_alias,
    unregister,
)
from .sidetune import SideNetwork, SidetuneOptions

__all__ = [
    "ADAMW_LR_GRID",
    "ALIASES",
    "METHODS",
    "SGD_LR_GRID",
    "WD_GRID",
    "Adapter",
    "AdapterOptions",
    "BuildContext",
    "LoraLinear",
    "LoraOptions",
    "Method",
    "MlpHead",
    "SideNetwork",
    "SidetuneOptions",
    "build",
    "canonical_name",
    "get_method",
    "method_names",
    "register",
    "register_alias",
    "unregister",
]
