"""Tests for vptune.data: layouts, split reading, errors, decoding, the cache and normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import needs_real, tiny_dataset
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from vptune import data, preprocessing
from vptune.data import (
    SPLITS,
    DataError,
    ImageDataset,
    detect_layout,
    load_split,
    open_task,
    read_split,
    resolve_data,
)
from vptune.preprocessing import Preprocessing, normalize, to_rgb

CLASSES = ["cat", "dog", "fox"]


def save_image(path: Path, size: tuple[int, int] = (20, 30), mode: str = "RGB", seed: int = 0) -> Path:
    """Random-noise image of (width, height) ``size``; JPEG or PNG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_images(root: Path, n: int, suffix: str = ".png") -> list[tuple[str, int]]:
    """``n`` images under root/images, labels cycling over CLASSES."""
    entries = [(f"images/img_{i:03d}{suffix}", i % len(CLASSES)) for i in range(n)]
    for i, (rel, _) in enumerate(entries):
        save_image(root / rel, seed=i)
    return entries


def write_list(path: Path, entries: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in entries))


def make_vtab(root: Path, classes: bool = True) -> Path:
    entries = make_images(root, 10, ".png")
    train, val, test = entries[:5], entries[5:7], entries[7:]
    for name, split in [("train800.txt", train), ("val200.txt", val), ("train800val200.txt", train + val)]:
        write_list(root / name, split)
    write_list(root / "test.txt", test)
    if classes:
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


def make_fgvc(root: Path) -> Path:
    entries = make_images(root, 10, ".jpg")
    for name, split in [("train", entries[:5]), ("val", entries[5:7]), ("test", entries[7:])]:
        (root / f"{name}.json").write_text(json.dumps(dict(split), indent=0))
    (root / "classes.txt").write_text("\n".join(CLASSES))
    return root


def make_imagefolder(root: Path) -> Path:
    for split, per_class in [("train", 2), ("val", 1), ("test", 1)]:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                save_image(root / split / name / f"{i}.jpg", seed=c * 10 + i)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


BUILDERS = {"vtab": make_vtab, "fgvc": make_fgvc, "imagefolder": make_imagefolder}


@pytest.mark.parametrize("layout", BUILDERS)
def test_layouts_detected_and_read(tmp_path: Path, layout: str) -> None:
    root = BUILDERS[layout](tmp_path / layout)
    assert detect_layout(root) == layout
    task = open_task(root)
    assert (task.layout, task.classes, task.name, task.num_classes) == (layout, CLASSES, layout, 3)
    splits = {split: read_split(task, split) for split in SPLITS}
    assert splits["trainval"] == splits["train"] + splits["val"]
    assert all(path.is_absolute() and path.is_file() for path, _ in splits["trainval"] + splits["test"])
    assert {label for _, label in splits["train"]} == {0, 1, 2}


def test_vtab_labels_follow_list_file(tmp_path: Path) -> None:
    task = open_task(make_vtab(tmp_path))
    assert read_split(task, "val") == [(tmp_path / "images/img_005.png", 2), (tmp_path / "images/img_006.png", 0)]


def test_imagefolder_labels_are_sorted_folder_indices(tmp_path: Path) -> None:
    task = open_task(make_imagefolder(tmp_path))
    assert [(path.parent.name, label) for path, label in read_split(task, "val")] == [
        (c, i) for i, c in enumerate(CLASSES)
    ]
    assert len(read_split(task, "train")) == 6  # notes.txt is not an image


def test_classes_inferred_without_classes_txt(tmp_path: Path) -> None:
    task = open_task(make_vtab(tmp_path, classes=False))
    assert task.classes == ["0", "1", "2"]


def test_missing_list_file(tmp_path: Path) -> None:
    task = open_task(make_vtab(tmp_path))
    (tmp_path / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt"):
        read_split(task, "test")


def test_label_out_of_range(tmp_path: Path) -> None:
    task = open_task(make_vtab(tmp_path))
    (tmp_path / "val200.txt").write_text("images/img_005.png 2\nimages/img_006.png 7\n")
    with pytest.raises(DataError, match=r"val200\.txt:2: label 7 outside 0\.\.2 \(3 classes"):
        read_split(task, "val")


def test_label_out_of_range_in_json_names_line(tmp_path: Path) -> None:
    task = open_task(make_fgvc(tmp_path))
    (tmp_path / "val.json").write_text('{\n"images/img_005.jpg": 1,\n"images/img_006.jpg": 3\n}')
    with pytest.raises(DataError, match=r"val\.json:3: label 3"):
        read_split(task, "val")


@pytest.mark.parametrize("line", ["images/img_000.png", "images/img_000.png one", "images/img_000.png 1.5"])
def test_malformed_line(tmp_path: Path, line: str) -> None:
    task = open_task(make_vtab(tmp_path))
    (tmp_path / "train800.txt").write_text(f"images/img_001.png 1\n\n{line}\n")
    with pytest.raises(DataError, match=r"train800\.txt:3: expected"):
        read_split(task, "train")


@pytest.mark.parametrize("text", ['{"images/a.jpg": 1', '["images/a.jpg", 1]', '{"images/a.jpg": "1"}'])
def test_malformed_json(tmp_path: Path, text: str) -> None:
    task = open_task(make_fgvc(tmp_path))
    (tmp_path / "train.json").write_text(text)
    with pytest.raises(DataError, match="train.json"):
        read_split(task, "train")


def test_unknown_layout(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="train800.txt.*train.json"):
        detect_layout(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(tmp_path / "nowhere")


def test_unknown_split(tmp_path: Path) -> None:
    task = open_task(make_vtab(tmp_path))
    with pytest.raises(DataError, match="trainval"):
        read_split(task, "validation")


def test_imagefolder_unknown_class_folder(tmp_path: Path) -> None:
    task = open_task(make_imagefolder(tmp_path))
    save_image(tmp_path / "val" / "wolf" / "0.jpg")
    with pytest.raises(DataError, match="wolf"):
        read_split(task, "val")


def test_resolve_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_vtab(tmp_path / "mytask")
    monkeypatch.setenv("VPTUNE_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path / "mytask")
    assert resolve_data("mytask") == tmp_path / "mytask"
    assert resolve_data(tmp_path / "mytask") == tmp_path / "mytask"
    assert open_task("mytask").name == "mytask"
    with pytest.raises(DataError, match="no_such_task.*VPTUNE_DATA.*mytask"):
        resolve_data("no_such_task")


def corrupt_split(root: Path, n: int, bad: int) -> list[tuple[Path, int]]:
    items = []
    for i in range(n):
        path = root / f"{i:03d}.jpg"
        if i < bad:
            path.write_bytes(b"\x00not a jpeg" * 10)
        else:
            save_image(path, size=(6, 5), seed=i)
        items.append((path, i % 3))
    return items


def test_corrupt_image_dropped_with_warning(tmp_path: Path) -> None:
    items = corrupt_split(tmp_path, 150, bad=1)
    with pytest.warns(UserWarning, match="000.jpg"):
        ds = ImageDataset(items, Preprocessing(4))
    assert len(ds) == 149 and ds.labels == [label for _, label in items[1:]]
    assert ds[0][0].shape == (3, 4, 4)


def test_too_many_corrupt_images(tmp_path: Path) -> None:
    items = corrupt_split(tmp_path, 150, bad=2)
    with pytest.raises(DataError, match="2 of 150.*000.jpg.*001.jpg"):
        ImageDataset(items, Preprocessing(4))


def test_vtab_shapes(tmp_path: Path) -> None:
    ds = load_split(open_task(make_vtab(tmp_path)), "train", 16)
    assert ds.preprocessing == Preprocessing(16, protocol="vtab") and len(ds) == 5
    image, label = ds[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 0


def decoded(path: Path) -> np.ndarray:
    """What the pipeline makes of a 4x4 image file: (4, 4, 3) uint8 (no resize at its own size)."""
    return Preprocessing(4).decode(path).permute(1, 2, 0).numpy()


RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
COLOUR = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (4, 4), dtype=np.uint8)
DEEP = RNG.integers(0, 65536, (4, 4), dtype=np.uint16)


def over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return colour * a + 255 * (1 - a)


# mode: (how the file is made, what it must decode to, tolerance)
MODES = {
    "L": (lambda: Image.fromarray(GREY), lambda: np.repeat(GREY[..., None], 3, 2), 0),
    "I;16": (lambda: Image.fromarray(DEEP), lambda: np.repeat(np.rint(DEEP / 257.0)[..., None], 3, 2), 0),
    "RGB": (lambda: Image.fromarray(COLOUR), lambda: COLOUR, 0),
    "RGBA": (
        lambda: Image.fromarray(np.dstack([COLOUR, ALPHA])),
        lambda: over_white(COLOUR, ALPHA),
        1,
    ),
    "LA": (
        lambda: Image.fromarray(np.dstack([GREY, ALPHA])).convert("LA"),
        lambda: over_white(np.repeat(GREY[..., None], 3, 2), ALPHA),
        1,
    ),
    "P": (
        lambda: Image.fromarray(COLOUR).quantize(8),
        lambda: np.asarray(Image.fromarray(COLOUR).quantize(8).convert("RGB")),
        0,
    ),
    "CMYK": (
        lambda: Image.fromarray(COLOUR).convert("CMYK"),
        lambda: np.asarray(Image.fromarray(COLOUR).convert("CMYK").convert("RGB")),
        0,
    ),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_decodes_to_what_it_shows(tmp_path: Path, mode: str) -> None:
    make, expected, tolerance = MODES[mode]
    image = make()
    assert image.mode == mode
    image.save(tmp_path / "x.tiff" if mode == "CMYK" else tmp_path / "x.png")
    got = decoded(tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")).astype(int)
    assert np.abs(got - np.asarray(expected()).astype(int)).max() <= tolerance


def test_sixteen_bit_greyscale_is_not_white(tmp_path: Path) -> None:
    """PIL's own conversion clips 16-bit values to 255: a dark 16-bit photo would decode all white."""
    Image.fromarray(np.full((4, 4), 12000, dtype=np.uint16)).save(tmp_path / "dark.png")
    assert np.all(decoded(tmp_path / "dark.png") == round(12000 / 257))


def test_an_animation_decodes_to_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=10)
    pixels = decoded(tmp_path / "a.gif")
    assert pixels[..., 0].min() > 200 and pixels[..., 2].max() < 50


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone photo stored sideways with orientation 6 (turn 90 degrees clockwise to view)."""
    stored = np.zeros((2, 4, 3), dtype=np.uint8)  # 4 wide, 2 high, as stored
    stored[0, 0] = (255, 0, 0)  # the stored top-left pixel
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "phone.png", exif=exif)
    shown = np.asarray(to_rgb(Image.open(tmp_path / "phone.png")))
    assert shown.shape == (4, 2, 3)  # upright: 2 wide, 4 high
    assert shown[0, 1, 0] > 200 and shown[0, 0, 0] < 60  # the red corner is now top-right


def test_fgvc_stored_form_is_shorter_side_resize_then_centre_square(tmp_path: Path) -> None:
    path = save_image(tmp_path / "x.png", size=(20, 30))
    preprocess = Preprocessing(16, protocol="fgvc")
    assert preprocess.stored_size == 18 and Preprocessing(224, protocol="fgvc").stored_size == 256
    expected = Image.open(path).resize((18, 27), Image.Resampling.BICUBIC).crop((0, 4, 18, 22))
    assert torch.equal(preprocess.decode(path), torch.from_numpy(np.array(expected)).permute(2, 0, 1))


def fgvc_dataset(tmp_path: Path, train: bool, seed: int = 0) -> ImageDataset:
    return load_split(open_task(make_fgvc(tmp_path)), "train", 16, train=train, seed=seed)


def test_fgvc_eval_is_centre_crop(tmp_path: Path) -> None:
    ds = fgvc_dataset(tmp_path, train=False)
    stored = ds.preprocessing.decode(ds.items[0][0])
    assert ds.preprocessing.protocol == "fgvc" and torch.equal(ds[0][0], stored[:, 1:17, 1:17])
    views = [ds[0][0] for _ in range(10)]  # an eval view never changes: every access is the centre crop
    assert all(torch.equal(view, ds.preprocessing.eval_view(stored)) for view in views)


def test_fgvc_train_crops_random_flipped_and_reproducible(tmp_path: Path) -> None:
    ds = fgvc_dataset(tmp_path, train=True, seed=3)
    stored = ds.preprocessing.decode(ds.items[0][0])
    views = {
        (top, left, flip): view.flip(-1) if flip else view
        for top in range(3)
        for left in range(3)
        for flip in (False, True)
        for view in [stored[:, top : top + 16, left : left + 16]]
    }
    draws = [ds[0][0] for _ in range(40)]
    seen = {key for image in draws for key, view in views.items() if torch.equal(image, view)}
    assert {flip for _, _, flip in seen} == {False, True} and len({(t, left) for t, left, _ in seen}) > 1
    again = fgvc_dataset(tmp_path, train=True, seed=3)
    assert all(torch.equal(a, again[0][0]) for a in draws)
    ds.set_seed(3)
    assert torch.equal(ds[0][0], draws[0])


def test_cache_does_not_touch_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_split(open_task(make_vtab(tmp_path)), "test", 8)
    before = [ds[i][0] for i in range(len(ds))]
    for path, _ in ds.items:
        path.unlink()

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("image opened after preload")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    monkeypatch.setattr(preprocessing.Image, "open", refuse)
    assert all(torch.equal(ds[i][0], before[i]) for i in range(len(ds)))


def test_getitem_returns_copies(tmp_path: Path) -> None:
    ds = load_split(open_task(make_vtab(tmp_path)), "val", 8)
    ds[0][0].zero_()
    assert ds[0][0].any()


def test_normalize() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize(images, mean, std)
    expected = np.stack([(images[:, c].numpy() / 255.0 - mean[c]) / std[c] for c in range(3)], axis=1)
    assert out.dtype == torch.float32 and out.shape == images.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        normalize(images, (0.5,), (0.5,))


@pytest.mark.real
@needs_real("eurosat", backbone="dinov2-small")
def test_real_eurosat_splits() -> None:
    task = open_task("eurosat")
    assert (task.layout, task.num_classes) == ("vtab", 10)
    assert [len(read_split(task, split)) for split in SPLITS] == [800, 200, 1000, 2000]


@pytest.mark.real
@needs_real("flowers12")
def test_real_flowers12() -> None:
    task = open_task("flowers12")
    assert (task.layout, task.num_classes, len(read_split(task, "train"))) == ("fgvc", 12, 576)


@pytest.mark.real
@needs_real("eurosat")
def test_real_eurosat_val_loads() -> None:
    ds = load_split(open_task("eurosat"), "val", 32)
    assert len(ds) == 200 and ds[0][0].shape == (3, 32, 32) and set(ds.labels) <= set(range(10))


def test_only_fgvc_training_views_augment(tmp_path: Path) -> None:
    """What the cached frozen trunk relies on: a dataset that does not augment shows the same view every time."""
    assert fgvc_dataset(tmp_path / "a", train=True).augments
    assert not fgvc_dataset(tmp_path / "b", train=False).augments
    vtab = load_split(open_task(make_vtab(tmp_path / "c")), "train", 16, train=True)
    stored = vtab.preprocessing.decode(vtab.items[0][0])  # decoded anew from the file, as the reference
    assert not vtab.augments and all(torch.equal(vtab[0][0], stored) for _ in range(10))


# --- training batches --------------------------------------------------------------------------------------------


def _loaders(dataset):
    """A DataLoader as training used to draw batches, and what ``train_batches`` gives, with the same sampler."""

    def sampler():
        return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)

    return DataLoader(dataset, 4, sampler=sampler()), data.train_batches(dataset, 4, sampler(), torch.device("cpu"))


@pytest.mark.parametrize("kind", ["images", "tensors"])
def test_resident_batches_are_the_data_loaders_batches_in_its_order(kind: str) -> None:
    dataset = tiny_dataset(10)  # 10 = two batches of 4 and a last one of 2
    if kind == "tensors":  # a cached trunk: features and labels
        dataset = TensorDataset(torch.randn(10, 5, 3), torch.arange(10) % 3)
    reference, ours = _loaders(dataset)
    assert isinstance(ours, data.ResidentBatches) and len(ours) == len(reference) == 3
    for epoch in (0, 1):  # a new order every epoch, the same in both
        reference.sampler.set_epoch(epoch)
        ours.sampler.set_epoch(epoch)
        pairs = list(zip(reference, ours, strict=True))
        for (images, labels), (our_images, our_labels) in pairs:
            assert torch.equal(our_images, images) and torch.equal(our_labels, labels)
            assert our_labels.dtype == labels.dtype == torch.long


def test_augmented_or_oversized_splits_stream_through_a_data_loader(monkeypatch) -> None:
    dataset = tiny_dataset(8)
    dataset.augments = True  # a new crop at every access: cannot be stacked once
    assert isinstance(_loaders(dataset)[1], DataLoader)
    dataset.augments = False
    monkeypatch.setattr(data, "RESIDENT_LIMIT", 8 * 3 * 16 * 16 - 1)  # one byte short of the split
    assert isinstance(_loaders(dataset)[1], DataLoader)
    monkeypatch.setattr(data, "RESIDENT_LIMIT", 8 * 3 * 16 * 16)
    assert isinstance(_loaders(dataset)[1], data.ResidentBatches)


@pytest.mark.parametrize("label", ["1_0", "\u0663", "+1", "1.0", "-1", "0x1"])
def test_labels_are_plain_digits(tmp_path: Path, label: str) -> None:
    """Python's int() reads "1_0" as 10 and an Arabic-Indic three as 3: a list file must say what it means."""
    root = make_vtab(tmp_path)
    (root / "train800.txt").write_text(f"images/img_000.png {label}\n")
    with pytest.raises(DataError, match=r"train800\.txt:1: expected '<image path> <integer label>'"):
        read_split(open_task(root), "train")


@pytest.mark.parametrize("entry", ["../outside.png", "/etc/hosts", "images/../../outside.png"])
@pytest.mark.parametrize("layout", ["vtab", "fgvc"])
def test_list_entries_stay_inside_the_task_folder(tmp_path: Path, layout: str, entry: str) -> None:
    root = BUILDERS[layout](tmp_path / "task")
    save_image(tmp_path / "outside.png")
    if layout == "vtab":
        (root / "train800.txt").write_text(f"{entry} 0\n")
        where = "train800.txt:1"
    else:
        (root / "train.json").write_text(json.dumps({entry: 0}))
        where = "train.json:1"
    with pytest.raises(DataError, match=f"{where}: .* points outside the task folder"):
        read_split(open_task(root), "train")


def test_an_empty_class_folder_is_refused(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "task")
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="class folder .*empty holds no images"):
        read_split(open_task(root), "train")
