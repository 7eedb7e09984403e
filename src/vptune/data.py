"""Task data in memory: a split's images decoded once into a uint8 cache, and the batches training draws from it.

Which images and labels a split holds (layouts, carved splits) is :mod:`vptune.layouts`' business; its public names
are re-exported here. Images are decoded once by the model's :class:`~vptune.preprocessing.Preprocessing` and kept as
uint8; normalisation happens later, on the device.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from multiprocessing.pool import ThreadPool
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from tqdm import tqdm

from .layouts import (
    IMAGE_SUFFIXES,
    LAYOUTS,
    SPLITS,
    Carving,
    TaskData,
    data_home,
    detect_layout,
    open_task,
    read_split,
    resolve_data,
)
from .preprocessing import DataError, Preprocessing

__all__ = [
    "IMAGE_SUFFIXES", "LAYOUTS", "SPLITS", "Carving", "DataError", "ImageDataset", "ResidentBatches", "TaskData",
    "data_home", "detect_layout", "load_split", "open_task", "read_split", "resolve_data", "train_batches",
]  # fmt: skip

MAX_BAD_FRACTION = 0.01  # more unreadable images than this and the split is refused, not silently shrunk
PROGRESS_MIN_IMAGES = 200
DECODE_THREADS = 2


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

    def eval_image(self, index: int) -> torch.Tensor:
        """Image ``index``'s centre view (uint8), whatever ``train`` says: what an initialisation looks at."""
        return self.preprocessing.eval_view(self._stored[index]).clone()

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
