"""Your own data: split folders under the names people use, carved splits (stratified, seeded, recorded), layouts
refused before any image is decoded, and schedules whose warmup fits the run."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vptune import cli, engine, preprocessing
from vptune.data import Carving, DataError, open_task, read_split
from vptune.engine import TrainConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}
FLAGS = ["--method", "linear", "--image-size", "16", "--epochs", "2", "--batch-size", "8", "--base-lr", "1.0"]


def colour_images(folder: Path, colour: str, count: int, seed: int = 0) -> None:
    """``count`` noisy PNGs of one colour in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        noise = rng.integers(-20, 20, (16, 16, 3))
        pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{colour}_{i:02d}.png")


def split_folders(root: Path, counts: dict[str, int]) -> Path:
    """Split folders (their names as given) of one class folder per colour."""
    for split, count in counts.items():
        for c, colour in enumerate(COLOURS):
            colour_images(root / split / colour, colour, count, seed=c + 10 * len(split))
    return root


def class_folders(root: Path, per_class: dict[str, int]) -> Path:
    """Class folders only, with ``per_class`` images each."""
    for c, (colour, count) in enumerate(per_class.items()):
        colour_images(root / colour, colour, count, seed=c)
    return root


@pytest.mark.parametrize(
    "names", [("training", "validation", "testing"), ("train", "valid", "test"), ("Train", "Dev", "TEST")]
)
def test_split_folders_under_the_names_people_use(tmp_path: Path, names: tuple[str, str, str]) -> None:
    root = split_folders(tmp_path / "photos", dict(zip(names, (4, 2, 3), strict=True)))
    task = open_task(root)
    assert (task.layout, task.classes, task.carved) == ("imagefolder", sorted(COLOURS), ())
    counts = {split: row["images"] for split, row in task.summary().items()}
    assert counts == {"train": 12, "val": 6, "trainval": 18, "test": 9}
    assert task.source("val") == f"{names[1]}/" and task.source("trainval") == f"{names[0]}/ + {names[1]}/"


def _labels(items) -> Counter:
    return Counter(label for _, label in items)


def test_a_missing_val_split_is_carved_stratified_and_seeded(tmp_path: Path) -> None:
    root = split_folders(tmp_path / "photos", {"train": 10, "test": 3})
    task = open_task(root)
    assert task.carved == ("val",)
    train, val, trainval = (read_split(task, split) for split in ("train", "val", "trainval"))
    assert _labels(val) == {0: 2, 1: 2, 2: 2}  # 20 % of each class
    assert _labels(train) == {0: 8, 1: 8, 2: 8}
    assert not set(train) & set(val) and sorted(trainval) == sorted(train + val)
    assert sorted(trainval) == sorted(read_split(open_task(root), "trainval"))  # every original training image
    assert read_split(open_task(root), "val") == val  # the same on every call
    assert read_split(open_task(root, Carving(seed=1)), "val") != val  # a seed of its own gives another carving
    assert "carved from train/: 20% of each class, seed 0" in task.describe()


def test_class_folders_alone_get_test_then_val_carved(tmp_path: Path) -> None:
    root = class_folders(tmp_path / "flat", {"red": 10, "green": 10, "blue": 20})
    task = open_task(root)
    assert (task.layout, task.carved) == ("classfolders", ("test", "val"))
    test, val, train = (read_split(task, split) for split in ("test", "val", "train"))
    assert task.classes == ["blue", "green", "red"]  # sorted folder names
    assert _labels(test) == {0: 4, 1: 2, 2: 2}  # a fifth of each class, the larger class more
    assert _labels(val) == {0: 3, 1: 2, 2: 2}  # a fifth of what is left (8 -> 2 rounds; 16 -> 3)
    everything = sorted(path for path in root.rglob("*.png"))
    assert sorted(path for path, _ in train + val + test) == everything  # disjoint and complete
    assert len(set(train + val + test)) == len(everything)
    record = task.record()
    assert record["carved"] == ["test", "val"]
    assert record["carving"] == {"val_fraction": 0.2, "test_fraction": 0.2, "seed": 0, "stratified": True}


def test_a_class_of_one_image_stays_in_train(tmp_path: Path) -> None:
    root = class_folders(tmp_path / "flat", {"red": 1, "green": 10, "blue": 10})
    task = open_task(root)
    red = task.classes.index("red")
    assert _labels(read_split(task, "train"))[red] == 1
    assert red not in _labels(read_split(task, "test")) and red not in _labels(read_split(task, "val"))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda root: split_folders(root, {"val": 2, "validation": 2, "train": 3}),
            r"val/ and validation/: both could be.*Keep one",
        ),
        (lambda root: colour_images(root, "red", 3), r"one folder per class.*Found: 3 file\(s\) \(3 \.png\)"),
        (lambda root: class_folders(root, {"red": 3}), r"cannot tell the layout.*Found: 1 folder\(s\) red/"),
        (lambda root: split_folders(root, {"validation": 2, "test": 2}), r"no training split"),
    ],
    ids=["two val folders", "loose images", "one class", "no train"],
)
def test_what_cannot_work_is_refused_saying_what_would(tmp_path: Path, make, message: str) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    make(root)
    with pytest.raises(DataError, match=message):
        open_task(root).summary()


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded before the layout was checked")

    monkeypatch.setattr(preprocessing.Preprocessing, "decode", refuse)


def test_train_refuses_a_broken_split_before_decoding_or_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, saved_backbone: str, capsys
) -> None:
    root = split_folders(tmp_path / "photos", {"train": 4, "val": 2, "test": 2})
    (root / "test" / "purple").mkdir()  # an empty class folder in test only
    _no_decoding(monkeypatch)
    out = tmp_path / "run"
    code = cli.main(["train", "--data", str(root), "--backbone", saved_backbone, *FLAGS, "--out", str(out)])
    assert code != 0 and "purple" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("layout", ["aliases", "train-test", "classfolders"])
def test_each_layout_trains_and_records_its_carving(tmp_path: Path, layout: str, saved_backbone: str, capsys) -> None:
    builders = {
        "aliases": lambda root: split_folders(root, {"training": 8, "validation": 3, "testing": 4}),
        "train-test": lambda root: split_folders(root, {"train": 10, "test": 4}),
        "classfolders": lambda root: class_folders(root, dict.fromkeys(COLOURS, 15)),
    }
    root, out = builders[layout](tmp_path / "photos"), tmp_path / "run"
    assert cli.main(["train", "--data", str(root), "--backbone", saved_backbone, *FLAGS, "--out", str(out)]) == 0
    assert "images" in capsys.readouterr().err  # the layout and split sizes, told before training
    task = open_task(root)
    config = json.loads((out / "config.json").read_text())
    record = json.loads((out / "vptune.json").read_text())
    assert config["splits"]["data"] == record["data"] == task.record()
    assert config["splits"]["images"] == task.summary(("train", "val", "test"))
    assert (record["data"]["carving"] is None) == (layout == "aliases")
    assert record["metrics"]["test_accuracy"] == 1.0  # colours are easy: the carved test split is the one scored
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--split", "test", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["count"] == len(read_split(task, "test")) and scored["accuracy"] == 1.0


def test_eval_carves_as_the_run_did(tmp_path: Path, saved_backbone: str, capsys) -> None:
    root = class_folders(tmp_path / "flat", dict.fromkeys(COLOURS, 12))
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(root), "--backbone", saved_backbone, *FLAGS, "--out", str(out)]) == 0
    record_path = out / "vptune.json"
    record = json.loads(record_path.read_text())
    record["data"]["carving"]["seed"] = 5  # as if the run had carved with seed 5
    record_path.write_text(json.dumps(record))
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == len(read_split(open_task(root, Carving(seed=5)), "test"))
    assert Carving.recorded(record["data"]) == Carving(seed=5)
    assert Carving.recorded({"carving": None}) is None


def test_a_five_epoch_run_with_default_warmup_reaches_its_peak_lr(tmp_path: Path, saved_backbone: str) -> None:
    root = split_folders(tmp_path / "photos", {"train": 8, "val": 2, "test": 2})
    out = tmp_path / "run"
    flags = ["--method", "linear", "--image-size", "16", "--epochs", "5", "--batch-size", "8", "--base-lr", "0.5"]
    assert cli.main(["train", "--data", str(root), "--backbone", saved_backbone, *flags, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [row for row in rows if not row.get("final")]
    peak = 0.5 * 8 / 256
    assert max(row["lr_peak"] for row in epochs) == pytest.approx(peak)
    assert epochs[0]["lr_peak"] == pytest.approx(peak)  # 3 steps an epoch, warmup round(0.5 * 3) = 2 steps
    assert json.loads((out / "config.json").read_text())["train"]["warmup_epochs"] == 0.5


def test_a_warmup_as_long_as_the_run_is_cut_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"warmup of 10 epochs is not shorter than the run's 5.*using 0\.5"):
        resolved = TrainConfig(epochs=5, warmup_epochs=10).for_method("linear")
    assert resolved.warmup_epochs == 0.5
    assert TrainConfig(epochs=5, warmup_epochs=2).for_method("linear").warmup_epochs == 2
    assert TrainConfig(epochs=100).for_method("linear").warmup_epochs == 10  # the paper's 10 of 100
    assert TrainConfig(epochs=3, warmup_epochs=0).warmup == 0


def test_bf16_on_a_cpu_without_bf16_units_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain, amx = tmp_path / "plain", tmp_path / "amx"
    plain.write_text("flags\t\t: fpu sse avx2 fma\n")
    amx.write_text("flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    assert (engine.cpu_has_bf16_units(plain), engine.cpu_has_bf16_units(amx)) == (False, True)
    assert engine.cpu_has_bf16_units(tmp_path / "missing") is None
    monkeypatch.setattr(engine, "cpu_has_bf16_units", lambda: False)
    with pytest.warns(UserWarning, match="without bf16 units.*--precision auto"):
        engine.warn_slow_bf16(torch.device("cpu"), "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.warn_slow_bf16(torch.device("cpu"), "auto")
        monkeypatch.setattr(engine, "cpu_has_bf16_units", lambda: True)
        engine.warn_slow_bf16(torch.device("cpu"), "bf16")
