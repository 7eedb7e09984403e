"""Task data: three on-disk layouts, split reading, and an in-memory uint8 image cache.

Layouts (``SPLITS`` maps to):

* ``vtab``: ``train800.txt`` / ``val200.txt`` / ``train800val200.txt`` / ``test.txt``, lines ``images/<file> <label>``.
* ``fgvc``: ``train.json`` / ``val.json`` / (both) / ``test.json``, each ``{"images/<file>": label}``.
* ``imagefolder``: ``train/`` / ``val/`` / (``train/`` + ``val/``) / ``test/``, one sub-folder per class.

Images are decoded once by the model's :class:`~vptune.preprocessing.Preprocessing` and kept as uint8;
normalisation happens later, on the device.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path, PurePath

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from tqdm import tqdm

from .preprocessing import DataError, Preprocessing

SPLITS = ("train", "val", "trainval", "test")
SPLIT_SOURCES = {
    "vtab": {
        "train": ("train800.txt",),
        "val": ("val200.txt",),
        "trainval": ("train800val200.txt",),
        "test": ("test.txt",),
    },
    "fgvc": {
        "train": ("train.json",),
        "val": ("val.json",),
        "trainval": ("train.json", "val.json"),
        "test": ("test.json",),
    },
    "imagefolder": {"train": ("train",), "val": ("val",), "trainval": ("train", "val"), "test": ("test",)},
}
LABEL = re.compile("[0-9]+")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
MAX_BAD_FRACTION = 0.01  # more unreadable images than this and the split is refused, not silently shrunk
PROGRESS_MIN_IMAGES = 200
DECODE_THREADS = 2


class _Pairs(list):
    """A JSON object as its (key, value) pairs, in file order (duplicates kept)."""


def data_home() -> Path:
    """Folder holding the task directories: ``$VPTUNE_DATA``, else ``<repo>/../shared/data``."""
    if env := os.environ.get("VPTUNE_DATA"):
        return Path(env).expanduser()
    beside_repo = Path(__file__).resolve().parents[3] / "shared" / "data"
    return beside_repo if beside_repo.is_dir() else Path.cwd() / ".." / "shared" / "data"


def resolve_data(name_or_path: str | os.PathLike) -> Path:
    """Find a task directory.

    Args:
        name_or_path: An existing path (used as is) or a bare task name looked up in ``data_home()``.

    Returns:
        The absolute task directory.

    Raises:
        DataError: Nothing found; the message lists what was tried.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path.resolve()
    home, tried = data_home(), [str(path)]
    if len(path.parts) == 1:
        if (home / path).exists():
            return (home / path).resolve()
        tried.append(str(home / path))
    known = sorted(p.name for p in home.iterdir() if p.is_dir()) if home.is_dir() else []
    raise DataError(
        f"no task data {str(name_or_path)!r}: tried {', '.join(tried)}. Pass the path of a task directory, or set "
        f"VPTUNE_DATA to the folder holding task directories (now {home}; tasks there: {known or 'none'})."
    )


def detect_layout(root: Path) -> str:
    """Tell which layout a task directory uses: ``"vtab"``, ``"fgvc"`` or ``"imagefolder"``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"task directory {root} does not exist or is not a directory")
    for layout, splits in SPLIT_SOURCES.items():
        names = {name for sources in splits.values() for name in sources}
        if any((root / name).exists() for name in names) and (layout != "imagefolder" or (root / "train").is_dir()):
            return layout
    raise DataError(
        f"cannot tell the layout of {root}: expected train800.txt/val200.txt/train800val200.txt/test.txt (vtab), "
        "train.json/val.json/test.json (fgvc) or train/, val/, test/ folders of class folders (imagefolder)."
    )


@dataclass(frozen=True)
class TaskData:
    """A task directory, its layout and its class names (index = label)."""

    root: Path
    layout: str
    classes: list[str]
    name: str

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def protocol(self) -> str:
        """The preprocessing protocol its layout implies: ``"fgvc"`` for the FGVC json layout, else ``"vtab"``."""
        return "fgvc" if self.layout == "fgvc" else "vtab"


def open_task(name_or_path: str | os.PathLike) -> TaskData:
    """Resolve a task, detect its layout and read its class names."""
    root = resolve_data(name_or_path)
    layout = detect_layout(root)
    classes = _read_classes(root, layout)
    if not classes:
        raise DataError(f"no classes found in {root}: add classes.txt or class folders under {root / 'train'}")
    return TaskData(root=root, layout=layout, classes=classes, name=root.name)


def _read_classes(root: Path, layout: str) -> list[str]:
    path = root / "classes.txt"
    if path.is_file():
        classes = path.read_text(encoding="utf-8").rstrip().splitlines()
        if not classes:
            raise DataError(f"{path} is empty: write one class name per line (line i = name of label i)")
        return [c.strip() for c in classes]
    if layout == "imagefolder":
        return sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    sources = {name for names in SPLIT_SOURCES[layout].values() for name in names}
    labels = [
        label for name in sorted(sources) if (root / name).is_file() for _, label, _ in _read_entries(root / name)
    ]
    if not labels:
        raise DataError(f"no labels found in {root}: add classes.txt or non-empty split files")
    return [str(i) for i in range(max(labels) + 1)]


def _read_entries(path: Path) -> list[tuple[str, int, str]]:
    """(relative image path, label, "file:line") for every entry of a list or JSON split file."""
    if not path.is_file():
        raise DataError(f"split file {path} is missing: create it, or choose a split that exists")
    text = path.read_text(encoding="utf-8")
    return _read_json(path, text) if path.suffix == ".json" else _read_list(path, text)


def _read_list(path: Path, text: str) -> list[tuple[str, int, str]]:
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not LABEL.fullmatch(parts[1]):  # plain digits: int() would take "1_0" and "٣"
            raise DataError(f"{path}:{lineno}: expected '<image path> <integer label>', got {line!r}")
        entries.append((parts[0], int(parts[1]), f"{path}:{lineno}"))
    return entries


def _read_json(path: Path, text: str) -> list[tuple[str, int, str]]:
    try:
        pairs = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as err:
        raise DataError(f'{path}:{err.lineno}: invalid JSON ({err.msg}); expected {{"images/<file>": label}}') from err
    if not isinstance(pairs, _Pairs):
        raise DataError(f'{path}: expected a JSON object {{"images/<file>": label}}, got {type(pairs).__name__}')
    entries, cursor, lineno = [], 0, 1
    for rel, label in pairs:
        found = text.find(json.dumps(rel), cursor)  # keys come in file order: one pass finds every line number
        if found >= 0:
            lineno, cursor = lineno + text.count("\n", cursor, found), found
        where = f"{path}:{lineno}" if found >= 0 else str(path)
        if not isinstance(label, int) or isinstance(label, bool):
            raise DataError(f"{where}: label of {rel!r} must be an integer, got {label!r}")
        entries.append((rel, label, where))
    return entries


def _read_folder(folder: Path, classes: list[str]) -> list[tuple[str, int, str]]:
    if not folder.is_dir():
        raise DataError(f"split folder {folder} is missing: create it with one sub-folder per class")
    index = {name: i for i, name in enumerate(classes)}
    entries = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if class_dir.name not in index:
            raise DataError(f"class folder {class_dir} is not a class of the task (classes: {classes}); rename it")
        files = [p for p in sorted(class_dir.rglob("*")) if _is_image(p)]
        if not files:
            raise DataError(f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                            "add its images or remove the folder")  # fmt: skip
        entries += [(str(p), index[class_dir.name], str(class_dir)) for p in files]
    return entries


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _inside(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, refusing a path that leaves the task folder (absolute, or climbing out with ``..``)."""
    pure = PurePath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"{where}: {relative!r} points outside the task folder {root}; list images inside it")
    return root / pure


def read_split(task: TaskData, split: str) -> list[tuple[Path, int]]:
    """List a split's images.

    Args:
        task: The task, from ``open_task``.
        split: One of ``SPLITS``.

    Returns:
        ``(absolute image path, label)`` pairs in file order.

    Raises:
        DataError: Unknown split, missing or malformed split file, label outside ``0..C-1``, or an empty split.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    root = task.root.absolute()
    items = []
    for source in SPLIT_SOURCES[task.layout][split]:
        if task.layout == "imagefolder":
            entries = _read_folder(root / source, task.classes)
        else:
            entries = _read_entries(root / source)
        for rel, label, where in entries:
            path = Path(rel) if task.layout == "imagefolder" else _inside(root, rel, where)
            if not 0 <= label < task.num_classes:
                raise DataError(
                    f"{where}: label {label} outside 0..{task.num_classes - 1} ({task.num_classes} classes in "
                    f"{root / 'classes.txt'}); fix the label or add the class"
                )
            items.append((path, label))
    if not items:
        raise DataError(f"split {split!r} of {root} lists no images ({', '.join(SPLIT_SOURCES[task.layout][split])})")
    return items


class ImageDataset(Dataset):
    """Images decoded once into a uint8 cache; yields ``(uint8 (3, image_size, image_size), label)``.

    Every image is decoded up front (threads); unreadable ones are warned about and dropped, and more than
    ``MAX_BAD_FRACTION`` of them raises ``DataError``. Training views (FGVC protocol) draw from the dataset's own
    generator: use ``num_workers=0`` in a DataLoader (the data is in memory anyway) so that the random crops and
    flips follow ``set_seed``.
    """

    def __init__(
        self, items: list[tuple[Path, int]], preprocessing: Preprocessing, train: bool = False, seed: int = 0
    ) -> None:
        self.items = [(Path(path), int(label)) for path, label in items]
        self.labels = [label for _, label in self.items]
        self.preprocessing = preprocessing
        self.train = train
        self.generator = torch.Generator()
        self.set_seed(seed)
        self._stored: list[torch.Tensor] = []
        self._decode_all()

    def set_seed(self, seed: int) -> None:
        """Reseed the crops and flips of training views."""
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        stored = self._stored[index]
        if self.train:
            return self.preprocessing.train_view(stored, self.generator), self.labels[index]
        return self.preprocessing.eval_view(stored).clone(), self.labels[index]

    @property
    def augments(self) -> bool:
        """Whether an image's view changes from one access to the next (FGVC training views); else it can be cached."""
        return self.train and self.preprocessing.augments

    def _decode_all(self) -> None:
        """Decode every image (threads), dropping unreadable ones with a warning."""
        bar = tqdm(
            total=len(self.items), desc="decoding images", unit="img", leave=False,
            disable=len(self.items) <= PROGRESS_MIN_IMAGES,
        )  # fmt: skip
        stored: list[torch.Tensor | None] = [None] * len(self.items)
        errors: dict[int, DataError] = {}
        with bar, ThreadPool(DECODE_THREADS) as pool:
            for index, result in pool.imap(self._try_decode, range(len(self.items)), chunksize=8):
                if isinstance(result, DataError):
                    errors[index] = result
                else:
                    stored[index] = result
                bar.update()
        self._stored = stored  # type: ignore[assignment]
        if errors:
            self._drop(errors)

    def _try_decode(self, index: int) -> tuple[int, torch.Tensor | DataError]:
        try:
            return index, self.preprocessing.decode(self.items[index][0])
        except DataError as err:
            return index, err

    def _drop(self, errors: dict[int, DataError]) -> None:
        if len(errors) > MAX_BAD_FRACTION * len(self.items):
            first = "; ".join(str(self.items[i][0]) for i in sorted(errors)[:5])
            raise DataError(
                f"{len(errors)} of {len(self.items)} images are unreadable (more than {MAX_BAD_FRACTION:.0%}), "
                f"first: {first}. Check the task directory; re-extract or replace these files"
            )
        for err in errors.values():
            warnings.warn(f"{err}; dropped from the dataset", stacklevel=3)
        keep = [i for i in range(len(self.items)) if i not in errors]
        self.items = [self.items[i] for i in keep]
        self.labels = [self.labels[i] for i in keep]
        self._stored = [self._stored[i] for i in keep]


def load_split(
    task: TaskData, split: str, preprocessing: Preprocessing | int, train: bool = False, seed: int = 0
) -> ImageDataset:
    """Read a split into an :class:`ImageDataset`.

    Args:
        task: the task, from :func:`open_task`.
        split: one of ``SPLITS``.
        preprocessing: the model's :class:`Preprocessing`, or an input side (then the task's own protocol).
        train: training views (random crops and flips under the FGVC protocol).
        seed: seeds those random views.
    """
    if isinstance(preprocessing, int):
        preprocessing = Preprocessing(preprocessing, protocol=task.protocol)
    return ImageDataset(read_split(task, split), preprocessing, train=train, seed=seed)


# --- training batches --------------------------------------------------------------------------------------------

RESIDENT_LIMIT = 2 * 2**30  # a train split up to this many bytes is stacked once on the training device


class ResidentBatches:
    """A train split stacked once on the training device; each batch is one index lookup there.

    No per-sample Python work, no collation, no host-to-device copy per step. Yields the same batches in the same
    order as ``DataLoader(dataset, batch_size, sampler=sampler)`` (the sampler is read again at every epoch).
    """

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, sampler: Sampler[int]) -> None:
        self.inputs, self.labels, self.batch_size, self.sampler = inputs, labels, batch_size, sampler

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long, device=self.inputs.device)
        for index in order.split(self.batch_size):
            yield self.inputs[index], self.labels[index]


def train_batches(
    dataset: Dataset, batch_size: int, sampler: Sampler[int], device: torch.device
) -> ResidentBatches | DataLoader:
    """What a training loop iterates: :class:`ResidentBatches` when the split never changes from one access to the
    next (no augmentation) and fits on the device (at most ``RESIDENT_LIMIT`` bytes; on CUDA, a quarter of the free
    memory), else a ``DataLoader`` (pinned memory on CUDA)."""
    if getattr(dataset, "augments", False) or not len(dataset) or _stacked_bytes(dataset) > _room(device):
        return DataLoader(dataset, batch_size, sampler=sampler, pin_memory=device.type == "cuda")
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, labels = dataset.tensors
    else:
        samples = [dataset[index] for index in range(len(dataset))]
        inputs = torch.stack([sample[0] for sample in samples])
        labels = torch.tensor([int(sample[1]) for sample in samples], dtype=torch.long)
    return ResidentBatches(inputs.to(device), labels.to(device), batch_size, sampler)


def _stacked_bytes(dataset: Dataset) -> int:
    first = dataset[0][0]
    return first.numel() * first.element_size() * len(dataset)


def _room(device: torch.device) -> int:
    """Bytes a stacked split may take on ``device``: ``RESIDENT_LIMIT``, and on CUDA a quarter of the free memory."""
    if device.type == "cuda":
        return min(RESIDENT_LIMIT, torch.cuda.mem_get_info(device)[0] // 4)
    return RESIDENT_LIMIT
