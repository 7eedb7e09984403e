"""Checks every registered method passes, parametrised over the registry: a method is tested by registering it.

This file registers a toy method of its own (``toy-last-blocks``: prompts in the last blocks only, with an option),
and the same checks run on it as on the paper's methods: it trains only its own tensors, saves and reloads exactly,
runs through ``vptune.run`` and the command line, and is served from one backbone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE, pixels, tiny_backbone
from test_cache import fixed

import vptune
from vptune import PromptConfig, TrainConfig
from vptune.batched import fit_batched
from vptune.cli import main
from vptune.config import check_fields, option
from vptune.engine import Splits
from vptune.methods import METHODS, BuildContext, register
from vptune.perf import rows

CLASSES = 3


@dataclass
class LastBlocksOptions:
    """Options of the toy method."""

    blocks: int = option(1, "toy-last-blocks: prompt only the last this-many blocks")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")


@register(
    "toy-last-blocks", "prompts in the last blocks only (a toy registered by the tests)", options=LastBlocksOptions,
    prompt={"num_tokens": 2, "dropout": 0.0}, servable=True, batchable=True, perf_rows=("",),
)  # fmt: skip
def _toy(context: BuildContext) -> vptune.TaskModel:
    prompt = context.prompt or PromptConfig(num_tokens=2)
    last = list(range(-context.options.blocks, 0))
    return context.model(dataclasses.replace(prompt, layers=last, deep=len(last) > 1))


def concrete(name: str) -> str:
    """A registered name as a user writes it (``mlp-<k>`` -> ``mlp-2``)."""
    return name.replace("<k>", "2")


REGISTERED = [concrete(name) for name in METHODS]


def make(method: str, backbone: vptune.Backbone, seed: int = 0) -> vptune.TaskModel:
    registered = vptune.methods.get_method(method)[0]
    prompt = registered.prompt_config(dropout=0.0) if registered.prompted else None
    return vptune.build(method, backbone, CLASSES, prompt, IMAGE, seed=seed)


def sgd_steps(model: vptune.TaskModel, steps: int = 2) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, labels = pixels(model.backbone, batch=6, seed=3), torch.arange(6) % CLASSES
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    model.eval()


def test_the_toy_is_registered() -> None:
    assert "toy-last-blocks" in REGISTERED and "mlp-2" in REGISTERED and len(REGISTERED) == len(METHODS)


@pytest.mark.parametrize("method", REGISTERED)
def test_trains_its_own_tensors_and_leaves_the_backbone(family: str, method: str) -> None:
    backbone = tiny_backbone(family)
    shared = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    model = make(method, backbone)
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= set(trainable) or any(n.startswith("head.") for n in trainable)
    assert not {id(p) for p in backbone.parameters()} & {id(p) for p in model.parameters() if p.requires_grad}
    learned = set(model.task_state_dict())  # trained tensors, and statistics training updates (BatchNorm's)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if n not in learned}
    sgd_steps(model)
    after = model.state_dict()
    assert all(not torch.equal(after[n], trainable[n]) for n in trainable), "every trainable tensor learns"
    assert all(torch.equal(after[n], frozen[n]) for n in frozen), "every frozen tensor stays bit-identical"
    assert all(torch.equal(t, shared[n]) for n, t in backbone.state_dict().items())
    assert not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("method", REGISTERED)
def test_save_and_load_give_the_same_logits(method: str, tmp_path: Path) -> None:
    backbone = tiny_backbone("dinov2")
    model = make(method, backbone, seed=3)
    sgd_steps(model)
    vptune.save_task(model, tmp_path, classes=["a", "b", "c"])
    loaded = vptune.load_task(tmp_path, backbone=backbone)
    x = pixels(backbone, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert (loaded.method, loaded.options, loaded.classes) == (method, model.options, ["a", "b", "c"])
    assert set(vptune.read_record(tmp_path)["tensors"]) == set(model.task_state_dict())


@pytest.mark.parametrize("method", REGISTERED)
def test_served_from_one_backbone_or_refused(method: str) -> None:
    backbone = tiny_backbone("dinov2")
    tasks = [make(method, backbone, seed=1), make("linear", backbone, seed=2), make(method, backbone, seed=3)]
    for task in tasks:
        sgd_steps(task)
    if not vptune.methods.get_method(method)[0].servable:
        with pytest.raises(ValueError, match="changes the backbone's weights or computation"):
            vptune.MultiTask(backbone, tasks)
        return
    served = vptune.MultiTask(backbone, tasks)
    ids = torch.tensor([0, 1, 2, 2, 0, 1])
    x = pixels(backbone, batch=len(ids), seed=7)
    for row, (logits, index) in enumerate(zip(served(x, ids), ids.tolist(), strict=True)):
        with torch.no_grad():
            torch.testing.assert_close(logits, tasks[index](x[row : row + 1])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", REGISTERED)
def test_batched_training_equals_separate_runs_or_is_refused(method: str) -> None:
    backbone, splits = tiny_backbone("dinov2"), Splits(fixed(8), val=fixed(4, seed=1))
    configs = [
        TrainConfig(epochs=1, warmup_epochs=0, batch_size=4, base_lr=lr, seed=seed, data_seed=0, progress=False)
        for lr, seed in ((0.5, 0), (0.2, 1))
    ]
    together = [make(method, backbone, seed=config.seed) for config in configs]
    if not vptune.methods.get_method(method)[0].batchable:
        with pytest.raises(ValueError, match="cannot be batched"):
            fit_batched(together, splits, configs)
        return
    fit_batched(together, splits, configs)
    for model, config in zip(together, configs, strict=True):
        alone = make(method, backbone, seed=config.seed)
        vptune.fit(alone, splits, config)
        for name, tensor in alone.trainable_state_dict().items():
            torch.testing.assert_close(model.trainable_state_dict()[name], tensor, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", REGISTERED)
def test_traits_are_usable(method: str) -> None:
    registered = vptune.methods.get_method(method)[0]
    assert registered.optimizer in ("sgd", "adamw") and registered.base_lr > 0
    assert all(lr > 0 for lr in registered.lr_grid) and all(wd >= 0 for wd in registered.wd_grid)
    TrainConfig(**registered.demo)  # its demo schedule is a valid training config
    assert registered.prompted == (registered.prompt_config() is not None)
    for field in dataclasses.fields(registered.options) if registered.options else []:
        assert field.metadata.get("help"), f"{method}: option {field.name} has no help"
    assert all(registered.name + suffix in rows() for suffix in registered.perf_rows)


def test_the_toy_trains_through_run_and_the_command_line(tmp_path, saved_backbone, tiny_task, capsys) -> None:
    spec = vptune.RunSpec(str(tiny_task), "toy-last-blocks", saved_backbone, IMAGE, options={"blocks": 2})
    spec = dataclasses.replace(spec, train=TrainConfig(epochs=1, warmup_epochs=0, batch_size=8, progress=False))
    result = vptune.run(spec, tmp_path / "api")
    assert result.model.prompts.layers == [0, 1] and result.spec.options == {"blocks": 2}  # the saved DINOv2: 2 blocks
    argv = ["train", "--data", str(tiny_task), "--backbone", saved_backbone, "--method", "toy-last-blocks"]
    argv += ["--blocks", "1", "--image-size", "16", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "cli")]
    assert main(argv) == 0
    record = vptune.read_record(tmp_path / "cli")
    assert record["method"] == "toy-last-blocks" and record["options"] == {"blocks": 1}
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["options"] == {"blocks": 1}
    loaded = vptune.load_task(tmp_path / "cli")
    assert loaded.prompts.layers == [1] and loaded.classes == ["red", "green", "blue"]
    capsys.readouterr()
    image = next((tiny_task / "images").glob("test_*.png"))
    assert main(["predict", str(tmp_path / "cli"), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] in ("red", "green", "blue")
