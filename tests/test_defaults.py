"""The documented defaults, pinned: what the code uses, what the paper's protocol says (its Sec. 4.1), and what the
README states agree, and training really runs with them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import IMAGE, tiny_backbone, tiny_dataset

import vptune
import vptune.loop
from vptune import PromptConfig, TrainConfig
from vptune.engine import Splits, make_optimizer
from vptune.methods import ADAMW_LR_GRID, METHODS, SGD_LR_GRID, WD_GRID

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
NUMBER = r"([0-9.]+)"


def stated() -> dict[str, float]:
    """The defaults as the README's Methods section states them."""
    text = " ".join(README.split())
    pattern = (
        rf"{NUMBER} prompt tokens, prompt dropout {NUMBER} for VPT-Deep and {NUMBER} for VPT-Shallow; SGD with "
        rf"momentum {NUMBER}, base lr {NUMBER} \(`full`: AdamW, {NUMBER}\), the lr being base lr x batch / 256, "
        rf"batch {NUMBER}, {NUMBER} epochs with {NUMBER} of warmup then cosine \(unset, warmup is a tenth of the "
        rf"epochs: a {NUMBER}-epoch run warms up for {NUMBER}\), weight decay {NUMBER}\."
    )
    match = re.search(pattern, text)
    assert match, "the README's sentence of defaults has changed: update it and this test together"
    keys = ("tokens", "deep_dropout", "shallow_dropout", "momentum", "sgd_lr", "adamw_lr", "batch", "epochs")
    keys += ("warmup", "short_epochs", "short_warmup", "weight_decay")
    return dict(zip(keys, map(float, match.groups()), strict=True))


def test_the_readme_states_the_codes_defaults() -> None:
    readme, config = stated(), TrainConfig()
    assert (config.epochs, config.warmup, config.batch_size) == (readme["epochs"], readme["warmup"], 64)
    short = TrainConfig(epochs=int(readme["short_epochs"]))
    assert config.warmup_epochs is None and short.warmup == readme["short_warmup"]
    assert readme["batch"] == 64 and config.weight_decay == readme["weight_decay"] == 1e-4
    assert config.momentum == readme["momentum"] == 0.9 and config.optimizer is None
    assert (config.cache, config.precision, config.seed) == ("auto", "auto", 0)
    deep, shallow = METHODS["vpt-deep"].prompt_config(), METHODS["vpt-shallow"].prompt_config()
    assert deep.num_tokens == shallow.num_tokens == readme["tokens"] == 10
    assert (deep.dropout, shallow.dropout) == (readme["deep_dropout"], readme["shallow_dropout"]) == (0.1, 0.0)
    assert (deep.init, deep.location, deep.readout, deep.project) == ("xavier", None, None, 0)  # None: family's
    assert "default `cls`, on MAE `all`" in README
    assert readme["sgd_lr"] == 0.1 and readme["adamw_lr"] == 0.0005 and readme["epochs"] == 100


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_resolves_to_the_documented_optimiser(name: str) -> None:
    method, config = METHODS[name], TrainConfig().for_method(name.replace("<k>", "2"))
    adamw = name == "full"
    assert (config.optimizer, config.base_lr) == (("adamw", 0.0005) if adamw else ("sgd", 0.1))
    assert (method.optimizer, method.base_lr) == (config.optimizer, config.base_lr)
    assert method.lr_grid == (ADAMW_LR_GRID if adamw else SGD_LR_GRID) and method.wd_grid == WD_GRID
    assert config.lr == pytest.approx(config.base_lr * 64 / 256)  # base lr x batch / 256


def test_the_papers_grids() -> None:
    assert SGD_LR_GRID == (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
    assert ADAMW_LR_GRID == (0.005, 0.001, 0.0005, 0.0001) and WD_GRID == (0.01, 0.001, 0.0001, 0.0)


@pytest.mark.parametrize(("name", "kind"), [("vpt-deep", torch.optim.SGD), ("full", torch.optim.AdamW)])
def test_fit_trains_with_the_defaults(monkeypatch, name: str, kind: type) -> None:
    """What fit builds from a config that sets nothing but the run's length: the documented optimiser."""
    made = []
    monkeypatch.setattr(vptune.loop, "make_optimizer", lambda *args: made.append(make_optimizer(*args)) or made[-1])
    prompt = PromptConfig(num_tokens=2) if name == "vpt-deep" else None
    model = vptune.build(name, tiny_backbone("vit"), 3, prompt, IMAGE)
    vptune.fit(model, Splits(tiny_dataset(8)), TrainConfig(epochs=1, warmup_epochs=0, progress=False))
    (optimizer,) = made
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, kind) and group["weight_decay"] == 1e-4
    assert group["momentum"] == 0.9 if kind is torch.optim.SGD else group["betas"] == (0.9, 0.999)
    peak = (0.1 if name == "vpt-deep" else 0.0005) * 64 / 256
    assert group["lr"] == pytest.approx(peak)  # one step (8 images < batch 64), no warmup: the cosine's start
