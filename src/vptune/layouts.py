"""Task folders: which layout a folder uses, its classes, and the images and labels of each split.

Layouts:

* ``vtab``: ``train800.txt`` / ``val200.txt`` / ``train800val200.txt`` / ``test.txt``, lines ``images/<file> <label>``.
* ``fgvc``: ``train.json`` / ``val.json`` / ``test.json``, each ``{"images/<file>": label}``.
* ``imagefolder``: split folders of class folders, under the names people use: ``train/`` (``training/``),
  ``val/`` (``validation/``, ``valid/``, ``dev/``), ``test/`` (``testing/``).
* ``classfolders``: class folders and nothing else (no split folders).

A split the folder does not have is **carved** from the training images: stratified (the same share of every
class), seeded, the same on every machine and run. A missing test split takes ``Carving.test_fraction`` of each
class first, then a missing val split takes ``Carving.val_fraction`` of what is left; a class of one image stays
whole in train. ``trainval`` is always train + val. Everything here lists files and reads list files; no image is
decoded, so a layout's mistakes surface before the slow part of a run.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePath

from .preprocessing import DataError

SPLITS = ("train", "val", "trainval", "test")
LIST_SOURCES = {
    "vtab": {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"},
    "fgvc": {"train": "train.json", "val": "val.json", "test": "test.json"},
}
SPLIT_FOLDERS = {
    "train": ("train", "training"),
    "val": ("val", "validation", "valid", "dev"),
    "test": ("test", "testing"),
}
LAYOUTS = ("vtab", "fgvc", "imagefolder", "classfolders")
LABEL = re.compile("[0-9]+")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
EXPECTED = (
    "one of: train800.txt/val200.txt/train800val200.txt/test.txt (vtab lists); train.json/val.json/test.json "
    "(fgvc); split folders train/ (or training/), val/ (validation/, valid/, dev/), test/ (testing/), each holding one "
    "folder per class (imagefolder); or just one folder per class (classfolders: val and test are carved from it)"
)

Item = tuple[Path, int]


@dataclass(frozen=True)
class Carving:
    """How missing val and test splits are carved from the training images (stratified, seeded)."""

    val_fraction: float = 0.2
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"Carving: {name} must be between 0 and 1 (exclusive), got {getattr(self, name)}")

    @classmethod
    def recorded(cls, data: dict | None) -> Carving | None:
        """The carving a task file's or run's ``data`` record used (None when it carved nothing or says nothing)."""
        carving = (data or {}).get("carving")
        if not isinstance(carving, dict):
            return None
        return cls(**{key: carving[key] for key in ("val_fraction", "test_fraction", "seed") if key in carving})


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


# --- which layout -------------------------------------------------------------------------------------------------


def detect_layout(root: Path) -> str:
    """Tell which layout a task directory uses: ``"vtab"``, ``"fgvc"``, ``"imagefolder"`` or ``"classfolders"``."""
    return _detect(Path(root))[0]


def _detect(root: Path) -> tuple[str, dict[str, str]]:
    """The layout and, for split folders, the folder each split comes from."""
    if not root.is_dir():
        raise DataError(f"task directory {root} does not exist or is not a directory")
    for layout, sources in LIST_SOURCES.items():
        if any((root / name).is_file() for name in sources.values()):
            return layout, {}
    folders = _split_folders(root)
    if folders:
        if "train" not in folders:
            raise DataError(
                f"{root} has {', '.join(f'{name}/' for name in folders.values())} but no training split: add a "
                f"train/ (or training/) folder of class folders. Found: {_found(root)}"
            )
        return "imagefolder", folders
    if sum(_holds_images(folder) for folder in _class_folders(root)) >= 2:
        return "classfolders", {}
    raise DataError(f"cannot tell the layout of {root}: expected {EXPECTED}. Found: {_found(root)}")


def _split_folders(root: Path) -> dict[str, str]:
    """Split -> the folder name it has in ``root`` (names matched without regard to case)."""
    present = {p.name.lower(): p.name for p in root.iterdir() if p.is_dir()}
    folders = {}
    for split, names in SPLIT_FOLDERS.items():
        found = [present[name] for name in names if name in present]
        if len(found) > 1:
            raise DataError(
                f"{root} has {' and '.join(f'{name}/' for name in found)}: both could be the {split} split. "
                "Keep one (rename or move the other)"
            )
        if found:
            folders[split] = found[0]
    return folders


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def _holds_images(folder: Path) -> bool:
    return any(_is_image(path) for path in folder.rglob("*"))


def _found(root: Path, shown: int = 8) -> str:
    """What a folder holds, briefly: its sub-folders and its files by suffix."""
    entries = sorted(root.iterdir())
    folders = [f"{p.name}/" for p in entries if p.is_dir()]
    suffixes = Counter(p.suffix.lower() or "(no suffix)" for p in entries if p.is_file())
    parts = []
    if folders:
        more = f" and {len(folders) - shown} more" if len(folders) > shown else ""
        parts.append(f"{len(folders)} folder(s) {', '.join(folders[:shown])}{more}")
    if suffixes:
        parts.append(f"{sum(suffixes.values())} file(s) (" + ", ".join(f"{n} {s}" for s, n in suffixes.items()) + ")")
    return "; ".join(parts) or "nothing"


# --- the task -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskData:
    """A task directory: its layout, class names (index = label), where each split comes from, and what is carved.

    ``folders`` maps a split to its folder (split-folder layouts); ``carved`` names the splits carved from the
    training images (see the module's docstring).
    """

    root: Path
    layout: str
    classes: list[str]
    name: str
    folders: dict[str, str] = field(default_factory=dict)
    carved: tuple[str, ...] = ()
    carving: Carving = field(default_factory=Carving)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def protocol(self) -> str:
        """The preprocessing protocol its layout implies: ``"fgvc"`` for the FGVC json layout, else ``"vtab"``."""
        return "fgvc" if self.layout == "fgvc" else "vtab"

    def source(self, split: str) -> str:
        """Where a split's images come from, in words."""
        if split == "trainval":
            return "train + val" if self.carved else self._named("trainval")
        if split in self.carved:
            share = self.carving.test_fraction if split == "test" else self.carving.val_fraction
            rest = " left after the test split" if split == "val" and "test" in self.carved else ""
            return f"carved from {self._named('train')}{rest}: {share:.0%} of each class, seed {self.carving.seed}"
        minus = [f"the carved {name}" for name in self.carved]
        return self._named(split) + (f" minus {' and '.join(minus)}" if split == "train" and minus else "")

    def _named(self, split: str) -> str:
        if self.layout == "classfolders":
            return "the class folders"
        if self.layout == "imagefolder":
            return " + ".join(f"{self.folders[s]}/" for s in _parts(split) if s in self.folders)
        if split == "trainval" and self.layout == "fgvc":
            return f"{LIST_SOURCES['fgvc']['train']} + {LIST_SOURCES['fgvc']['val']}"
        return LIST_SOURCES[self.layout][split]

    def summary(self, splits: tuple[str, ...] = SPLITS) -> dict[str, dict]:
        """Each split's image count and source, reading every list and folder (no image is decoded): a mistake in
        any of them (a missing file, a bad label, an empty class folder) raises here, before a run starts."""
        return {split: {"images": len(read_split(self, split)), "from": self.source(split)} for split in splits}

    def describe(self, splits: tuple[str, ...] = SPLITS) -> str:
        """A few lines for a person: the task, its layout and classes, each split's size and source."""
        lines = [f"task {self.name} ({self.root}): {self.layout} layout, {self.num_classes} classes"]
        for split, row in self.summary(splits).items():
            lines.append(f"  {split:<9} {row['images']:>7} images  {row['from']}")
        return "\n".join(lines)

    def record(self) -> dict:
        """What a task file and a run's config say about the data: name, folder, layout, sources, carving."""
        carving = {"val_fraction": self.carving.val_fraction, "test_fraction": self.carving.test_fraction}
        return {
            "name": self.name,
            "path": str(self.root),
            "layout": self.layout,
            "splits": {split: self.source(split) for split in SPLITS},
            "carved": list(self.carved),
            "carving": {**carving, "seed": self.carving.seed, "stratified": True} if self.carved else None,
        }


def _parts(split: str) -> tuple[str, ...]:
    return ("train", "val") if split == "trainval" else (split,)


def open_task(name_or_path: str | os.PathLike, carving: Carving | None = None) -> TaskData:
    """Resolve a task, detect its layout, read its class names and tell which splits are carved.

    Args:
        name_or_path: a task folder, or a task name under :func:`data_home`.
        carving: the shares and seed of carved splits (default :class:`Carving`: 20 %, 20 %, seed 0).
    """
    root = resolve_data(name_or_path)
    layout, folders = _detect(root)
    classes = _read_classes(root, layout, folders)
    if len(classes) < 2:
        where = root / folders.get("train", "") if layout != "classfolders" else root
        raise DataError(
            f"{len(classes)} class(es) found in {where} ({classes}): a classifier needs at least 2. Add class "
            f"folders or classes.txt. Found in {root}: {_found(root)}"
        )
    carved = tuple(split for split in ("test", "val") if not _has_source(root, layout, folders, split))
    if not _has_source(root, layout, folders, "train") and not _has_source(root, layout, folders, "trainval"):
        raise DataError(f"{root} has no training split: expected {EXPECTED}. Found: {_found(root)}")
    return TaskData(root, layout, classes, root.name, folders, carved, carving or Carving())


def _has_source(root: Path, layout: str, folders: dict[str, str], split: str) -> bool:
    if layout == "classfolders":
        return split == "train"
    if layout == "imagefolder":
        return split in folders
    name = LIST_SOURCES[layout].get(split)
    return name is not None and (root / name).is_file()


def _read_classes(root: Path, layout: str, folders: dict[str, str]) -> list[str]:
    path = root / "classes.txt"
    if path.is_file():
        classes = path.read_text(encoding="utf-8").rstrip().splitlines()
        if not classes:
            raise DataError(f"{path} is empty: write one class name per line (line i = name of label i)")
        return [c.strip() for c in classes]
    if layout in ("imagefolder", "classfolders"):
        return [p.name for p in _class_folders(root / folders.get("train", ""))]
    sources = [root / name for name in LIST_SOURCES[layout].values() if (root / name).is_file()]
    labels = [label for path in sources for _, label, _ in _read_entries(path)]
    if not labels:
        raise DataError(f"no labels found in {root}: add classes.txt or non-empty split files")
    return [str(i) for i in range(max(labels) + 1)]


# --- reading a split ----------------------------------------------------------------------------------------------


def read_split(task: TaskData, split: str) -> list[Item]:
    """List a split's images (nothing is decoded).

    Args:
        task: The task, from ``open_task``.
        split: One of ``SPLITS``.

    Returns:
        ``(absolute image path, label)`` pairs in file order (carved splits keep that order).

    Raises:
        DataError: Unknown split, missing or malformed split file, label outside ``0..C-1``, or an empty split.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    items = _split(task, split)
    if not items:
        raise DataError(f"split {split!r} of {task.root} lists no images ({task.source(split)})")
    return items


def _split(task: TaskData, split: str) -> list[Item]:
    if split == "trainval":
        return _split(task, "train") + _split(task, "val") if task.carved else _own(task, "trainval")
    if split == "test":
        return _carve(_train_source(task), task.carving.test_fraction, task.carving.seed)[1] if "test" in task.carved \
            else _own(task, "test")  # fmt: skip
    pool = _train_source(task)
    if "test" in task.carved:
        pool = _carve(pool, task.carving.test_fraction, task.carving.seed)[0]
    if "val" not in task.carved:
        return pool if split == "train" else _own(task, "val")
    kept, carved = _carve(pool, task.carving.val_fraction, task.carving.seed)
    return kept if split == "train" else carved


def _train_source(task: TaskData) -> list[Item]:
    """The training images before any carving (a list layout without a train list: trainval minus val)."""
    if _has_source(task.root, task.layout, task.folders, "train"):
        return _own(task, "train")
    val = set(_own(task, "val")) if "val" not in task.carved else set()
    return [item for item in _own(task, "trainval") if item not in val]


def _own(task: TaskData, split: str) -> list[Item]:
    """A split as the folder itself has it (no carving)."""
    root = task.root.absolute()
    if task.layout == "classfolders":
        return _read_folder(root, task.classes)
    if task.layout == "imagefolder":
        return [item for part in _parts(split) for item in _read_folder(root / task.folders[part], task.classes)]
    names = [LIST_SOURCES[task.layout][part] for part in (_parts(split) if task.layout == "fgvc" else (split,))]
    items = []
    for name in names:
        for rel, label, where in _read_entries(root / name):
            if not 0 <= label < task.num_classes:
                raise DataError(
                    f"{where}: label {label} outside 0..{task.num_classes - 1} ({task.num_classes} classes in "
                    f"{root / 'classes.txt'}); fix the label or add the class"
                )
            items.append((_inside(root, rel, where), label))
    return items


def _carve(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Split ``items`` into (kept, carved): ``fraction`` of each class (at least one image of a class of two or more,
    never a class's last), chosen by ``seed`` from the class's paths in sorted order; both keep ``items``' order."""
    by_class: dict[int, list[Path]] = defaultdict(list)
    for path, label in items:
        by_class[label].append(path)
    rng, chosen = random.Random(seed), set()
    for label in sorted(by_class):
        paths = sorted(by_class[label], key=str)
        count = min(max(round(fraction * len(paths)), 1), len(paths) - 1)
        rng.shuffle(paths)
        chosen.update((path, label) for path in paths[:count])
    return [item for item in items if item not in chosen], [item for item in items if item in chosen]


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


def _read_folder(folder: Path, classes: list[str]) -> list[Item]:
    if not folder.is_dir():
        raise DataError(f"split folder {folder} is missing: create it with one sub-folder per class")
    index = {name: i for i, name in enumerate(classes)}
    class_dirs = _class_folders(folder)
    if not class_dirs and any(_is_image(p) for p in folder.iterdir()):
        raise DataError(
            f"{folder} holds images but no class folders: put each class's images in a sub-folder named after "
            f"the class ({folder}/<class>/<image>)"
        )
    items = []
    for class_dir in class_dirs:
        if class_dir.name not in index:
            raise DataError(f"class folder {class_dir} is not a class of the task (classes: {classes}); rename it")
        files = [p for p in sorted(class_dir.rglob("*")) if _is_image(p)]
        if not files:
            raise DataError(f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                            "add its images or remove the folder")  # fmt: skip
        items += [(p, index[class_dir.name]) for p in files]
    return items


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _inside(root: Path, relative: str, where: str) -> Path:
    """``root / relative``, refusing a path that leaves the task folder (absolute, or climbing out with ``..``)."""
    pure = PurePath(relative)
    if pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"{where}: {relative!r} points outside the task folder {root}; list images inside it")
    return root / pure
