"""The frozen trunk's outputs kept from one run to the next: the same outputs as computed anew, each image through the
trunk once, a new computation for anything the output depends on (backbone, input, cache point, the file), nothing
kept past the limit or for random views; and a head-only sweep that sends each image through the trunk once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import vptune
import vptune.model
from vptune.cli import main
from vptune.data import ImageDataset, load_split
from vptune.engine import TrainConfig, cache_dataset
from vptune.preprocessing import Preprocessing
from vptune.sweep.timing import BATCH, PROBE_STEPS
from vptune.trunk_memory import TrunkMemory, keep_trunk_outputs

CONFIG = TrainConfig(batch_size=4, eval_batch_size=5, progress=False)
CPU = torch.device("cpu")
SPLITS = ("train800", "val200", "test")


@pytest.fixture
def linear(saved_backbone, tiny_task):
    task = vptune.open_task(str(tiny_task))
    model = vptune.build("linear", vptune.load_backbone(saved_backbone), task.num_classes, image_size=16)
    return task, model


def trunk_of(model, dataset) -> torch.Tensor:
    """The outputs computed anew, with no memory."""
    return cache_dataset(model, dataset, model.cache_point(), CONFIG, CPU).tensors[0]


def test_an_image_goes_through_the_trunk_once(linear) -> None:
    task, model = linear
    train, trainval = (load_split(task, split, model.preprocessing) for split in ("train", "trainval"))
    fresh = trunk_of(model, trainval)
    with keep_trunk_outputs() as memory:
        first = cache_dataset(model, train, model.cache_point(), CONFIG, CPU)
        assert memory.computed == len(train) == len(memory)
        again = cache_dataset(model, trainval, model.cache_point(), CONFIG, CPU)  # train's images read back
        assert memory.computed == len(trainval) == len(memory)
    assert torch.allclose(again.tensors[0], fresh, atol=1e-6)
    assert torch.equal(again.tensors[0][: len(train)], first.tensors[0])
    assert again.tensors[1].tolist() == trainval.labels


def test_what_an_output_depends_on_gives_a_new_computation(linear, saved_backbone) -> None:
    task, model = linear
    test = load_split(task, "test", model.preprocessing)
    other = vptune.build("linear", vptune.load_backbone(saved_backbone), task.num_classes, image_size=16)
    with torch.no_grad():
        next(other.backbone.parameters()).add_(1.0)  # other weights: another fingerprint
    with keep_trunk_outputs() as memory:
        cache_dataset(model, test, model.cache_point(), CONFIG, CPU)
        cache_dataset(model, test, model.cache_point(), CONFIG, CPU)
        assert memory.computed == len(test)
        kept = cache_dataset(other, test, other.cache_point(), CONFIG, CPU)
        assert memory.computed == 2 * len(test)
        assert torch.allclose(kept.tensors[0], trunk_of(other, test), atol=1e-6)
        cache_dataset(model, test, model.backbone.depth, CONFIG, CPU)  # another cache point
        assert memory.computed == 3 * len(test)
        larger = load_split(task, "test", Preprocessing(24, model.preprocessing.mean, model.preprocessing.std))
        cache_dataset(model, larger, model.cache_point(), CONFIG, CPU)  # another input size
        assert memory.computed == 4 * len(test)


def test_a_changed_file_is_computed_again(linear, tmp_path) -> None:
    task, model = linear
    paths = []
    for index, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        paths.append(tmp_path / f"{index}.png")
        Image.new("RGB", (20, 20), colour).save(paths[-1])
    items = [(path, index) for index, path in enumerate(paths)]
    with keep_trunk_outputs() as memory:
        before = cache_dataset(model, ImageDataset(items, model.preprocessing), model.cache_point(), CONFIG, CPU)
        Image.new("RGB", (20, 20), (250, 250, 250)).save(paths[0])
        os.utime(paths[0], ns=(1, 1))  # the same size and path, another modification time
        changed = ImageDataset(items, model.preprocessing)
        after = cache_dataset(model, changed, model.cache_point(), CONFIG, CPU)
        assert memory.computed == 4
    assert not torch.allclose(before.tensors[0][0], after.tensors[0][0])
    assert torch.allclose(after.tensors[0], trunk_of(model, changed), atol=1e-6)


def test_nothing_is_kept_past_the_limit_or_for_random_views(linear) -> None:
    task, model = linear
    test = load_split(task, "test", model.preprocessing)
    row = trunk_of(model, test)[0]
    limit = 5 * row.numel() * row.element_size()
    with keep_trunk_outputs(TrunkMemory(max_bytes=limit)) as memory:
        outputs = cache_dataset(model, test, model.cache_point(), CONFIG, CPU).tensors[0]
        assert len(memory) == 5 and memory.bytes <= limit
        assert torch.allclose(outputs, trunk_of(model, test), atol=1e-6)
    fgvc = Preprocessing(16, model.preprocessing.mean, model.preprocessing.std, protocol="fgvc")
    random_views = load_split(task, "train", fgvc, train=True)
    with keep_trunk_outputs() as memory:
        cache_dataset(model, random_views, model.cache_point(), CONFIG, CPU)
        assert len(memory) == 0


def test_a_head_only_sweep_sends_each_image_through_the_trunk_once(
    tmp_path, saved_backbone, tiny_task, monkeypatch
) -> None:
    """Three grid settings, a final run on train + val scored on test, the report's scoring of ``best/``: each image
    through the trunk once; the report's accuracy is the final run's."""
    seen: list[int] = []
    real = vptune.model.TaskModel.trunk

    def counted(self, pixel_values, point):
        seen.append(len(pixel_values))
        return real(self, pixel_values, point)

    monkeypatch.setattr(vptune.model.TaskModel, "trunk", counted)
    argv = ["sweep", "--data", str(tiny_task), "--method", "linear", "--backbone", saved_backbone, "--budget", "smoke"]
    assert main([*argv, "--lr", "0.1,0.5,2", "--out", str(tmp_path), "--no-progress"]) == 0
    train, val, test = (len(Path(tiny_task, f"{name}.txt").read_text().split()) // 2 for name in SPLITS)
    probe = min(train, PROBE_STEPS * BATCH) + min(val, BATCH)  # the estimate's measuring, on its own
    assert sum(seen) == probe + train + val + test
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["test_accuracy"] == report["best"]["recorded_test_accuracy"]
