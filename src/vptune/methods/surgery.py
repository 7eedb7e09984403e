"""Putting a trainable module in place of a frozen one inside a method's own copy of the backbone."""

from __future__ import annotations

from torch import nn


def replace_submodule(root: nn.Module, target: nn.Module, replacement: nn.Module) -> None:
    """Replace the submodule ``target`` of ``root`` (found by identity) with ``replacement``."""
    for name, module in root.named_modules():
        if module is target:
            parent_name, _, attribute = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attribute, replacement)
            return
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")
