"""The real pretrained DINOv2-S/14 and the real EuroSAT task (``$VPTUNE_WEIGHTS``/``$VPTUNE_DATA``, else ../shared;
skipped, saying where they were looked for, when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import needs_real
from torch.utils.data import Subset

import vptune
from vptune import PromptConfig, Splits, TrainConfig
from vptune.data import load_split, open_task
from vptune.preprocessing import normalize

EUROSAT = "eurosat"
SIZE = 56  # 4x4 patches of 14 pixels: small enough for a CPU

pytestmark = [
    pytest.mark.real,
    needs_real(EUROSAT),
]


@pytest.fixture(scope="module")
def backbone() -> vptune.Backbone:
    return vptune.load_backbone("dinov2-small")


@pytest.fixture(scope="module")
def subset() -> Subset:
    train = load_split(open_task(EUROSAT), "train", SIZE)
    return Subset(train, range(64))


def test_dinov2_small(backbone: vptune.Backbone) -> None:
    assert backbone.num_parameters() == 22_056_576
    assert (backbone.width, backbone.depth, backbone.patch_size, backbone.num_prefix_tokens) == (384, 12, 14, 1)
    assert backbone.family == "dinov2" and len(backbone.fingerprint()) == 16
    assert not any(p.requires_grad for p in backbone.parameters())


def test_features_are_the_models_own_class_token(backbone: vptune.Backbone, subset: Subset) -> None:
    images = torch.stack([subset[i][0] for i in range(4)])
    x = normalize(images, backbone.mean, backbone.std)
    model = vptune.build("linear", backbone, 10, image_size=SIZE).eval()
    with torch.no_grad():
        own = backbone.model(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(model.forward_features(x), own, atol=1e-5, rtol=1e-5)


def test_vpt_deep_steps_reduce_the_training_loss(tmp_path: Path, backbone: vptune.Backbone, subset: Subset) -> None:
    model = vptune.build("vpt-deep", backbone, 10, PromptConfig(num_tokens=5, dropout=0.0), image_size=SIZE)
    frozen = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    before = vptune.evaluate(model, subset, device="cpu")
    # DINOv2's normalised features are large: base_lr 0.5 already diverges here, 0.1 learns (2.5 -> ~1.2)
    config = TrainConfig(
        epochs=4, warmup_epochs=0, batch_size=16, base_lr=0.1, weight_decay=0.0, device="cpu", progress=False
    )
    vptune.fit(model, Splits(subset), config, out_dir=tmp_path)
    after = vptune.evaluate(model, subset, device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert after["loss"] < before["loss"]
    assert all(torch.equal(tensor, frozen[name]) for name, tensor in backbone.state_dict().items())

    vptune.save_task(model, tmp_path / "task", classes=open_task(EUROSAT).classes)
    loaded = vptune.load_task(tmp_path / "task")  # the backbone comes back from the recorded spec
    assert loaded.backbone.fingerprint() == backbone.fingerprint() and loaded.classes[0] == "AnnualCrop"
    x = normalize(torch.stack([subset[i][0] for i in range(4)]), backbone.mean, backbone.std)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
