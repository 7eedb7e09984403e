"""K configurations trained in one pass equal K separate runs that share the sample order (tolerance 1e-5)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import IMAGE, tiny_backbone
from test_cache import fixed

import vptune
from vptune.batched import fit_batched
from vptune.engine import Splits, TrainConfig

SETTINGS = [(0.5, 0.0, 0), (0.2, 1e-3, 1), (1.0, 1e-4, 2)]  # base lr, weight decay, seed (initialisation)


def models_and_configs(backbone, method: str, prompt: dict, cache: str = "auto"):
    models, configs = [], []
    for lr, wd, seed in SETTINGS:
        config = vptune.PromptConfig(**prompt) if prompt else None
        models.append(vptune.build(method, backbone, 3, config, IMAGE, seed=seed))
        configs.append(
            TrainConfig(epochs=2, warmup_epochs=1, batch_size=4, base_lr=lr, weight_decay=wd, seed=seed, data_seed=0,
                        cache=cache, progress=False)
        )  # fmt: skip
    return models, configs


@pytest.mark.parametrize(
    ("method", "prompt", "cache"),
    [
        ("vpt-deep", {"num_tokens": 2, "dropout": 0.0}, "auto"),
        ("vpt-shallow", {"num_tokens": 3}, "auto"),
        ("vpt-deep", {"num_tokens": 2, "dropout": 0.0, "layers": [-1]}, "auto"),  # cached trunk, batched prompts
        ("vpt-deep", {"num_tokens": 2, "dropout": 0.0, "kv_tokens": 2, "fourier": 0.5}, "auto"),  # beyond the paper
        ("linear", {}, "auto"),
        ("linear", {}, "off"),
    ],
)
def test_batched_equals_separate_runs(method: str, prompt: dict, cache: str) -> None:
    backbone = tiny_backbone("dinov2")
    splits = Splits(fixed(12), val=fixed(6, seed=1), test=fixed(6, seed=2))
    together, configs = models_and_configs(backbone, method, prompt, cache)
    start = [{n: t.clone() for n, t in m.trainable_state_dict().items()} for m in together]
    batched = fit_batched(together, splits, configs)
    alone, configs = models_and_configs(backbone, method, prompt, cache)
    separate = [vptune.fit(model, splits, config) for model, config in zip(alone, configs, strict=True)]
    for k in range(len(SETTINGS)):
        ours, theirs = together[k].trainable_state_dict(), alone[k].trainable_state_dict()
        for name in ours:
            assert not torch.equal(ours[name], start[k][name])  # it trained
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0)
        assert batched[k]["val_accuracy"] == separate[k]["val_accuracy"]
        assert batched[k]["test_accuracy"] == separate[k]["test_accuracy"]
        assert batched[k]["train_loss"] == pytest.approx(separate[k]["train_loss"], abs=1e-5)
        assert batched[k]["train_accuracy"] == separate[k]["train_accuracy"]  # the same metrics as fit's
        assert batched[k]["batched"] == 3


def test_batched_refuses_what_it_cannot_do() -> None:
    backbone = tiny_backbone("vit")
    models, configs = models_and_configs(backbone, "vpt-deep", {"num_tokens": 2})
    with pytest.raises(ValueError, match="must share epochs"):
        fit_batched(models, Splits(fixed(4)), [configs[0], TrainConfig(epochs=5), configs[2]])
    with pytest.raises(ValueError, match="SGD only"):
        fit_batched(models, Splits(fixed(4)), [TrainConfig(optimizer="adamw", base_lr=0.1)] * 3)
    with pytest.raises(ValueError, match="cannot be batched"):
        fit_batched([vptune.build("bias", backbone, 3, image_size=IMAGE)], Splits(fixed(4)), configs[:1])
    other = vptune.build("vpt-deep", backbone, 3, vptune.PromptConfig(num_tokens=5), IMAGE)
    with pytest.raises(ValueError, match="must share backbone, method, prompt config"):
        fit_batched([models[0], other], Splits(fixed(4)), configs[:2])


@pytest.mark.parametrize("how", ["max_loss", "base_lr"])
def test_a_diverging_configuration_stops_and_the_others_train_as_without_it(how: str) -> None:
    """Configuration 1 diverges (its loss above its limit at the first step, or an lr that makes its tensors
    infinite at the first update): it is recorded as diverged, keeps its starting tensors, and the others end with
    the tensors and scores they get when trained without it (and alone), each with its train accuracy."""
    backbone = tiny_backbone("dinov2")
    splits = Splits(fixed(12), val=fixed(6, seed=1), test=fixed(6, seed=2))
    models, configs = models_and_configs(backbone, "vpt-deep", {"num_tokens": 2, "dropout": 0.0})
    bad = {"max_loss": {"max_loss": 1e-3}, "base_lr": {"base_lr": 3.4e38 * 256 / 4, "weight_decay": 1e3}}[how]
    configs[1] = dataclasses.replace(configs[1], **bad)
    start = {name: tensor.clone() for name, tensor in models[1].trainable_state_dict().items()}
    together = fit_batched(models, splits, configs)
    assert together[1]["val_accuracy"] is None and together[1]["test_accuracy"] is None
    assert together[1]["diverged"].startswith("training diverged at epoch 1, step 1 ")
    assert ("the limit: max_loss 0.001" if how == "max_loss" else "non-finite") in together[1]["diverged"]
    assert all(torch.equal(tensor, start[name]) for name, tensor in models[1].trainable_state_dict().items())
    pair, pair_configs = models_and_configs(backbone, "vpt-deep", {"num_tokens": 2, "dropout": 0.0})
    without = fit_batched([pair[0], pair[2]], splits, [pair_configs[0], pair_configs[2]])
    alone, alone_configs = models_and_configs(backbone, "vpt-deep", {"num_tokens": 2, "dropout": 0.0})
    for k, other in ((0, 0), (2, 1)):
        separate = vptune.fit(alone[k], splits, alone_configs[k])
        for reference, model in ((without[other], pair[k]), (separate, alone[k])):
            for name, tensor in models[k].trainable_state_dict().items():
                torch.testing.assert_close(tensor, model.trainable_state_dict()[name], atol=1e-5, rtol=0)
            for key in ("val_accuracy", "test_accuracy", "train_accuracy"):
                assert together[k][key] == reference[key], key
        assert 0 <= together[k]["train_accuracy"] <= 1 and "diverged" not in together[k]


def test_batched_training_honours_checkpointing_and_refuses_what_it_cannot() -> None:
    backbone, splits = tiny_backbone("dinov2"), Splits(fixed(8), val=fixed(4, seed=1))
    results = []
    for options in ({}, {"checkpoint_blocks": 2}):
        models, configs = models_and_configs(backbone, "vpt-deep", {"num_tokens": 2, "dropout": 0.0})
        fit_batched(models, splits, [dataclasses.replace(config, **options) for config in configs])
        results.append([model.trainable_state_dict() for model in models])
    for plain, recomputed in zip(*results, strict=True):
        for name, tensor in plain.items():
            torch.testing.assert_close(recomputed[name], tensor, atol=1e-6, rtol=0)
    models, configs = models_and_configs(backbone, "vpt-deep", {"num_tokens": 2})
    with pytest.raises(ValueError, match="must share checkpointing"):
        fit_batched(models, splits, [configs[0], dataclasses.replace(configs[1], checkpointing=True), configs[2]])
    with pytest.raises(ValueError, match="cannot be batched"):
        fit_batched([vptune.build("vpt-shallow", backbone, 3, vptune.PromptConfig(2, project=4), IMAGE)],
                    splits, configs[:1])  # fmt: skip
