"""How an image becomes model input, as one object: made by ``build``, stored in the task file, and used alike by
data loading, training, ``predict``, :class:`~vptune.MultiTask` and ``serve``.

Images are decoded once into a stored uint8 square (``decode``), viewed at the input size (``eval_view``, or
``train_view`` with the FGVC protocol's random crop and flip), and normalised on their device (``normalize``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROTOCOLS = ("vtab", "fgvc")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(ValueError):
    """Bad or missing task data; the message names the file and how to fix it."""


@dataclass(frozen=True)
class Preprocessing:
    """Image size, resize protocol and normalisation of one task model.

    Attributes:
        image_size: side of the square model input.
        mean, std: per-channel normalisation, ``(x / 255 - mean) / std`` (the backbone's pretraining values).
        protocol: ``"vtab"``: square resize, no augmentation. ``"fgvc"``: resize the shorter side to
            ``round(image_size * 256 / 224)``, then random crop + horizontal flip (training) or centre crop.
    """

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    protocol: str = "vtab"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.protocol not in PROTOCOLS:
            raise DataError(f"unknown preprocessing protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise DataError(f"image_size must be a positive integer, got {self.image_size!r}")
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise DataError(f"mean and std need one value per channel, std > 0: got {self.mean}, {self.std}")

    @property
    def stored_size(self) -> int:
        """Side of the square a decoded image is stored at."""
        return self.image_size if self.protocol == "vtab" else round(self.image_size * 256 / 224)

    @property
    def augments(self) -> bool:
        """Whether training views are random (the FGVC protocol's crop and flip)."""
        return self.protocol == "fgvc"

    def decode(self, source: str | os.PathLike | BinaryIO) -> torch.Tensor:
        """An image file (path or binary stream) as its stored form: uint8 ``(3, S, S)``, ``S = stored_size``.

        Raises:
            DataError: the file is missing or not a readable image.
        """
        size = self.stored_size
        try:
            with Image.open(source) as opened:
                image = to_rgb(opened)
        except _DECODE_ERRORS as err:
            raise DataError(f"cannot read image {source}: {err}. Replace the file or remove it from the split") from err
        if self.protocol == "vtab":
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        else:
            image = _resize_shorter_side(image, size)
            left, top = round((image.width - size) / 2), round((image.height - size) / 2)
            image = image.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def eval_view(self, stored: torch.Tensor) -> torch.Tensor:
        """Centre crop a stored image (or batch) to ``image_size``; identity when already that size."""
        size, height, width = self.image_size, stored.shape[-2], stored.shape[-1]
        if height < size or width < size:
            raise DataError(
                f"stored image {height}x{width} is smaller than image_size {size}; decode it with this Preprocessing"
            )
        top, left = round((height - size) / 2), round((width - size) / 2)
        return stored[..., top : top + size, left : left + size]

    def train_view(self, stored: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A training view: a random crop and horizontal flip (FGVC), or the eval view (VTAB)."""
        if not self.augments:
            return self.eval_view(stored).clone()
        size, room = self.image_size, stored.shape[-1] - self.image_size
        top, left = torch.randint(0, room + 1, (2,), generator=generator).tolist()
        crop = stored[:, top : top + size, left : left + size]
        flip = bool(torch.rand((), generator=generator) < 0.5)
        return crop.flip(-1) if flip else crop.clone()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images ``(..., C, H, W)`` as float32 model input, on their own device."""
        return normalize(images, self.mean, self.std)

    def __call__(self, source: str | os.PathLike | BinaryIO) -> torch.Tensor:
        """An image file as model input: decoded, centre view, normalised; float32 ``(3, image_size, image_size)``."""
        return self.normalize(self.eval_view(self.decode(source)))

    def to_record(self) -> dict:
        """As stored in a task file's ``preprocessing``."""
        return {"image_size": self.image_size, "protocol": self.protocol, "mean": self.mean, "std": self.std}

    @classmethod
    def from_record(cls, record: dict) -> Preprocessing:
        """From a task file's ``preprocessing``."""
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB, as it looks: the EXIF orientation applied (phone photos), an animation's first frame,
    16-bit and float greyscale scaled to 8 bits (PIL's own conversion clips them to white), transparency laid over a
    white background."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_DEPTH_MODES:
        image = Image.fromarray(_eight_bits(np.asarray(image), image.mode))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _eight_bits(values: np.ndarray, mode: str) -> np.ndarray:
    """Greyscale of more than 8 bits as uint8: 16-bit modes scaled from 0..65535; 32-bit integers likewise unless
    they stay within 0..255 (then already 8-bit values); floats from 0..1, or clipped to 0..255 beyond that."""
    values = values.astype(np.float64)
    if mode == "F":
        scale = 255.0 if values.size and values.min() >= 0.0 and values.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0 if mode.startswith("I;16") or (values.size and values.max() > 255) else 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width <= height:
        new_size = (size, int(size * height / width))  # int() as torchvision's Resize(int)
    else:
        new_size = (int(size * width / height), size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Scale uint8 images ``(..., C, H, W)`` to float32 ``(x / 255 - mean) / std`` on their own device."""
    if len(mean) != images_uint8.shape[-3] or len(std) != images_uint8.shape[-3]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {images_uint8.shape[-3]} channels")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images_uint8.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images_uint8.device).view(-1, 1, 1)
    return (images_uint8.to(torch.float32) / 255 - mean_t) / std_t
