"""Task folders saved before the "One way in" restructuring (tests/legacy, written by make_legacy.py at commit
6b76526) load unchanged: the same method, prompt configuration and preprocessing as recorded, and the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vptune

LEGACY = Path(__file__).resolve().parent / "legacy"
BACKBONES = {"dinov2": LEGACY.parent / "golden" / "tiny-dinov2", "resnet": LEGACY / "tiny-resnet",
             "swin": LEGACY / "tiny-swin"}  # fmt: skip
TASKS = sorted(path.name for path in LEGACY.iterdir() if (path / "vptune.json").is_file())
# the names recorded before designs became prompt options, and what they are now
CANONICAL = {"vpt-deep+kv+fourier": "vpt-deep"}


@pytest.fixture(scope="module")
def backbones() -> dict[str, vptune.Backbone]:
    return {kind: vptune.load_backbone(f"hf:{folder}") for kind, folder in BACKBONES.items()}


def test_every_kind_of_task_is_there() -> None:
    assert len(TASKS) == 12 and {name.split("-")[0] for name in TASKS} == set(BACKBONES)


@pytest.mark.parametrize("name", TASKS)
def test_a_task_saved_before_loads_to_the_same_model(name: str, backbones) -> None:
    folder = LEGACY / name
    record = json.loads((folder / "vptune.json").read_text())
    model = vptune.load_task(folder, backbone=backbones[name.split("-")[0]])
    expected = load_file(str(folder / "expected.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(expected["inputs"]), expected["logits"], atol=1e-6, rtol=0)
    assert model.method == CANONICAL.get(record["method"], record["method"])
    assert model.preprocessing == vptune.Preprocessing.from_record(record["preprocessing"])
    ours = vptune.config.to_dict(model.prompt_config)
    assert {key: ours[key] for key in record["prompt"]} == record["prompt"]
