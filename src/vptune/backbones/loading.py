"""Backbones by spec string: the family registry, short names, and loading from the Hub or a local folder."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .base import Backbone

# Short names: a local folder (under $VPTUNE_WEIGHTS or ../shared/weights) tried first, then the Hub id.
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "dinov2-small": ("dinov2-small-imgfocus", "facebook/dinov2-small"),
    "dinov2-base": ("dinov2-base", "facebook/dinov2-base"),
    "vit-base-in21k": ("vit-base-patch16-224-in21k", "google/vit-base-patch16-224-in21k"),
    "clip-vit-base": ("clip-vit-base-patch16", "openai/clip-vit-base-patch16"),
    "mae-base": ("vit-mae-base", "facebook/vit-mae-base"),
}
SPEC_FORMS = (
    f"'hf:<hub id>' (e.g. hf:facebook/dinov2-small), 'hf:<local folder>', 'timm:<model name>[@<weights file>]', or "
    f"a short name ({', '.join(SHORT_NAMES)})"
)

FAMILIES: dict[str, type[Backbone]] = {}
# Loaders of spec forms other than Hub models and short names, by prefix (``"timm:"``): a family module adds its own
SPEC_LOADERS: dict[str, Callable[[str, torch.dtype], Backbone]] = {}


def register_family(family: type[Backbone]) -> type[Backbone]:
    """Make a :class:`Backbone` subclass loadable: by its ``model_types`` and wrappable by its ``model_classes``."""
    FAMILIES[family.family] = family
    return family


def _family_where(attribute: str, value: str) -> type[Backbone] | None:
    return next((family for family in FAMILIES.values() if value in getattr(family, attribute)), None)


def wrap_model(model: nn.Module, spec: str = "custom", preprocessing: dict | None = None) -> Backbone:
    """Wrap an already built transformers vision model (e.g. a tiny random one) as a :class:`Backbone`.

    Args:
        model: a model of a registered family (``ViTModel``, ``Dinov2Model``, ``CLIPVisionModel`` ...).
        spec: the name recorded in task files.
        preprocessing: optional ``{"mean", "std", "image_size"}`` overriding the family defaults.
    """
    kind = type(model).__name__
    family = _family_where("model_classes", kind)
    if family is None:
        supported = ", ".join(name for family in FAMILIES.values() for name in family.model_classes)
        raise ValueError(f"unsupported backbone class {kind}; supported: {supported}")
    size = family.native_size(family.config_of(model))
    prep = {"mean": family.default_mean, "std": family.default_std, "image_size": size}
    prep.update(preprocessing or {})
    return family(model, spec, prep["mean"], prep["std"], prep["image_size"])


def resolve_spec(spec: str) -> str:
    """Turn a spec into what ``from_pretrained`` takes: a local folder or a Hub id."""
    if spec.startswith("hf:"):
        target = spec[3:]
        if not target:
            raise ValueError(f"empty backbone spec {spec!r}; accepted forms: {SPEC_FORMS}")
        return target
    if spec in SHORT_NAMES:
        folder, hub_id = SHORT_NAMES[spec]
        for root in weight_roots():
            if (root / folder / "config.json").is_file():
                return str(root / folder)
        return hub_id
    raise ValueError(f"unknown backbone spec {spec!r}; accepted forms: {SPEC_FORMS}")


def weight_roots() -> list[Path]:
    roots = []
    if os.environ.get("VPTUNE_WEIGHTS"):
        roots.append(Path(os.environ["VPTUNE_WEIGHTS"]))
    roots.append(Path(__file__).resolve().parents[4] / "shared" / "weights")
    roots.append(Path.cwd().parent / "shared" / "weights")
    return roots


def load_backbone(spec: str, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a frozen pretrained backbone.

    Args:
        spec: ``"hf:<hub id>"``, ``"hf:<local folder>"``, a short name such as ``"dinov2-small"``
            (``$VPTUNE_WEIGHTS/dinov2-small-imgfocus``, default ``../shared/weights``, else the Hub), or
            ``"timm:<model name>[@<weights file>]"`` (needs the optional timm package; see ``backbones.timm_vit``).
        dtype: weight dtype.
    """
    from transformers import AutoConfig

    loader = next((load for prefix, load in SPEC_LOADERS.items() if spec.startswith(prefix)), None)
    if loader is not None:
        return loader(spec, dtype)
    source = resolve_spec(spec)
    try:
        config = AutoConfig.from_pretrained(source)
        family = _family_where("model_types", config.model_type)
        if family is None:
            known = ", ".join(t for family in FAMILIES.values() for t in family.model_types)
            raise ValueError(f"backbone {spec!r} is a {config.model_type!r} model; vptune loads: {known}")
        model = family.load_model(source, dtype)
    except OSError as error:
        raise ValueError(
            f"cannot load backbone {spec!r} from {source!r}: {error}. Pass a local folder as 'hf:<folder>' "
            "or set VPTUNE_WEIGHTS to the folder holding it."
        ) from error
    return wrap_model(model, spec, _preprocessor_config(source))


def _preprocessor_config(source: str) -> dict:
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    prep = {key: data[f"image_{key}"] for key in ("mean", "std") if f"image_{key}" in data}
    crop = data.get("crop_size") or data.get("size")
    if isinstance(crop, dict) and ("height" in crop or "shortest_edge" in crop):
        prep["image_size"] = int(crop.get("height", crop.get("shortest_edge")))
    return prep
