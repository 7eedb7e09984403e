"""The cached frozen trunk: where it starts per method, and that training on it equals training uncached."""

from __future__ import annotations

import pytest
import torch
from conftest import DEPTH, IMAGE, ImageSet, pixels, tiny_backbone, tiny_dataset

import vptune
from vptune.engine import Splits, TrainConfig, cache_point
from vptune.methods import build

CLASSES = 3


class FixedSet(ImageSet):
    """A dataset that declares it never augments (as vptune's VTAB-protocol datasets do): it may be cached."""

    augments = False


def fixed(n: int, seed: int = 0) -> FixedSet:
    data = tiny_dataset(n, CLASSES, seed=seed)
    return FixedSet(data.images, data.labels)


def make(method: str, family: str = "dinov2", **prompt) -> vptune.TaskModel:
    config = vptune.PromptConfig(**prompt) if prompt else None
    return build(method, tiny_backbone(family), CLASSES, prompt=config, image_size=IMAGE, seed=1)


@pytest.mark.parametrize(
    ("method", "prompt", "point"),
    [
        ("linear", {}, DEPTH + 1),
        ("mlp-2", {}, DEPTH + 1),
        ("partial-1", {}, DEPTH - 1),
        ("partial-3", {}, 0),
        ("vpt-deep", {"num_tokens": 2, "layers": [-1]}, DEPTH - 1),
        ("vpt-deep", {"num_tokens": 2, "layers": [1, 2]}, 1),
        ("vpt-shallow", {"num_tokens": 2, "layers": [2]}, 2),
        ("vpt-shallow", {"num_tokens": 2}, 0),
        ("vpt-deep", {"num_tokens": 2}, 0),
        ("bias", {}, 0),
        ("adapter", {}, 0),
        ("lora", {}, 0),
        ("sidetune", {}, 0),
        ("full", {}, 0),
    ],
)
def test_cache_point_per_method(family: str, method: str, prompt: dict, point: int) -> None:
    model = make(method, family, **prompt)
    assert model.cache_point() == point
    if point:  # the trunk and the rest compose to the whole model
        x = pixels(model.backbone)
        model.eval()
        assert torch.allclose(model.forward_from(model.trunk(x, point), point), model(x), atol=1e-6)


@pytest.mark.parametrize(
    ("method", "prompt"),
    [
        ("linear", {}),
        ("mlp-2", {}),
        ("partial-1", {}),
        ("vpt-deep", {"num_tokens": 2, "layers": [-2, -1], "dropout": 0.2}),
    ],
)
def test_cached_training_equals_uncached(method: str, prompt: dict) -> None:
    splits = Splits(fixed(12), val=fixed(6, seed=1), test=fixed(6, seed=2))
    results = {}
    for cache in ("auto", "off"):
        model = make(method, **prompt)
        config = TrainConfig(epochs=3, warmup_epochs=1, batch_size=4, base_lr=0.5, cache=cache, progress=False)
        metrics = vptune.fit(model, splits, config)
        results[cache] = (model.trainable_state_dict(), metrics)
    (cached, cached_metrics), (plain, plain_metrics) = results["auto"], results["off"]
    assert cached_metrics["cached_from"] == make(method, **prompt).cache_point() > 0
    assert plain_metrics["cached_from"] == 0
    assert cached.keys() == plain.keys()
    for name in cached:
        assert not torch.equal(cached[name], make(method, **prompt).trainable_state_dict()[name])  # it trained
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=0)
    for key in ("val_accuracy", "test_accuracy", "train_accuracy"):
        assert cached_metrics[key] == plain_metrics[key]
    assert cached_metrics["train_loss"] == pytest.approx(plain_metrics["train_loss"], abs=1e-5)


def test_augmenting_or_unknown_datasets_are_never_cached() -> None:
    model, config = make("linear"), TrainConfig()
    assert cache_point(model, fixed(4), config) == DEPTH + 1
    assert cache_point(model, tiny_dataset(4), config) == 0  # says nothing about augmentation: assumed to augment
    augmenting = fixed(4)
    augmenting.augments = True
    assert cache_point(model, augmenting, config) == 0
    assert cache_point(model, fixed(4), TrainConfig(cache="off")) == 0
