"""Shared fixtures: tiny random backbones of every supported family, and tiny in-memory image datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)

import vptune
from vptune.backbones import SHORT_NAMES, resolve_spec, weight_roots
from vptune.data import data_home
from vptune.preprocessing import normalize

# One thread: when another process holds a core, a thread pool makes tiny-model ops ~100x slower (and the real
# DINOv2-S test ~10x slower).
torch.set_num_threads(1)

FAMILIES = ("vit", "dinov2", "dinov2-registers", "clip", "mae")
WIDTH, DEPTH, PATCH, IMAGE = 32, 3, 4, 16
REGISTERS = 2
PREFIX = {"vit": 1, "dinov2": 1, "dinov2-registers": 1 + REGISTERS, "clip": 1, "mae": 1}
# A larger init range than the default 0.02 so that attention actually mixes tokens in a 32-wide model;
# dropout everywhere so that a backbone left in training mode would show.
COMMON = dict(
    hidden_size=WIDTH,
    num_hidden_layers=DEPTH,
    num_attention_heads=2,
    intermediate_size=2 * WIDTH,
    image_size=IMAGE,
    patch_size=PATCH,
    initializer_range=0.2,
)
VIT_DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def tiny_hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random transformers vision model of ``family`` (width 32, 3 blocks, patch 4, native size 16)."""
    torch.manual_seed(seed)
    common = {**COMMON, **overrides}
    if family == "vit":
        model = ViTModel(ViTConfig(**common, **VIT_DROPOUT), add_pooling_layer=False)
    elif family == "dinov2":
        model = Dinov2Model(Dinov2Config(**common, **VIT_DROPOUT, drop_path_rate=0.1))
    elif family == "dinov2-registers":
        config = Dinov2WithRegistersConfig(**common, **VIT_DROPOUT, drop_path_rate=0.1, num_register_tokens=REGISTERS)
        model = Dinov2WithRegistersModel(config)
    elif family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**common, attention_dropout=0.1, initializer_factor=5.0))
    elif family == "mae":  # masking configured as pretrained (75%): vptune must never apply it
        model = ViTMAEModel(ViTMAEConfig(**common, **VIT_DROPOUT, mask_ratio=0.75))
    else:
        raise ValueError(family)
    with torch.no_grad():  # transformers starts biases at 0; random ones make a dropped bias visible
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


def tiny_backbone(family: str, seed: int = 0) -> vptune.Backbone:
    """``tiny_hf_model`` wrapped as a frozen vptune backbone."""
    return vptune.wrap_model(tiny_hf_model(family, seed), spec=f"tiny-{family}")


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """The Transformer families whose blocks run on a flat token sequence, at the sizes above."""
    return request.param


# The tiny cases of every registered family (tests/test_families.py runs the checks of the one protocol on each):
# family -> its variants; a variant is built by ``family_backbone``. A family registered without one fails there.
FAMILY_VARIANTS = {"dinov2": ("dinov2", "dinov2-registers")}


def family_backbone(variant: str, seed: int = 0) -> vptune.Backbone:
    """A tiny random backbone of a registered family's variant (16x16 input, random biases and statistics)."""
    import test_convnets
    import test_swin
    import test_timm_fake

    builders = {
        "swin": test_swin.swin_backbone,
        "convnext": lambda seed: test_convnets.conv_backbone("convnext", seed),
        "resnet": lambda seed: test_convnets.conv_backbone("resnet", seed),
        "timm-vit": lambda seed: test_timm_fake.fake_backbone("vit_fake_reg", seed),
    }
    if variant in FAMILIES:
        return tiny_backbone(variant, seed)
    if variant not in builders:
        raise LookupError(f"no tiny case for family {variant!r}: add one to family_backbone in tests/conftest.py")
    return builders[variant](seed)


@pytest.fixture
def backbone(family: str) -> vptune.Backbone:
    return tiny_backbone(family)


def images(batch: int = 4, size: int | tuple[int, int] = IMAGE, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (B, 3, H, W)."""
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randint(0, 256, (batch, 3, height, width), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def pixels(backbone: vptune.Backbone, batch: int = 4, size: int | tuple[int, int] = IMAGE, seed: int = 0):
    """Random images normalised as ``backbone`` expects: model input."""
    return normalize(images(batch, size, seed), backbone.mean, backbone.std)


def trained_looking(
    backbone: vptune.Backbone, method: str, classes: int, seed: int, size: int = IMAGE, **prompt
) -> vptune.TaskModel:
    """A task with distinct tensors, in eval mode: its head and prompts drawn from ``seed`` (as if trained)."""
    config = vptune.PromptConfig(**prompt) if prompt else None
    model = vptune.build(method, backbone, classes, config, size, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.normal_(0, 1, generator=generator)
        if model.prompts is not None:
            model.prompts.embeddings.normal_(0, 1, generator=generator)
    return model.eval()


class ImageSet(Dataset):
    """In-memory dataset yielding ``(uint8 (3, S, S), int label)``, as the loaders of vptune.data do."""

    def __init__(self, stack: torch.Tensor, labels: list[int]):
        self.images, self.labels = stack, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index].clone(), self.labels[index]


def tiny_dataset(n: int = 16, num_classes: int = 3, size: int = IMAGE, seed: int = 0) -> ImageSet:
    """``n`` noisy images whose brightness tells the class, so that a model can learn them."""
    generator = torch.Generator().manual_seed(seed)
    labels = [i % num_classes for i in range(n)]
    base = torch.tensor(labels, dtype=torch.float32).view(-1, 1, 1, 1) * (200 / max(1, num_classes - 1)) + 20
    noise = torch.randint(-20, 21, (n, 3, size, size), generator=generator)
    return ImageSet((base + noise).clamp(0, 255).to(torch.uint8), labels)


@pytest.fixture(scope="session")
def saved_backbone(tmp_path_factory) -> str:
    """A tiny random DINOv2 saved as a transformers folder: the spec ``hf:<folder>``."""
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16)
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(config).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    """Three colour classes in the VTAB-1k list layout."""
    root = tmp_path_factory.mktemp("colors")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    colours = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
    lines: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for split, count in (("train800", 24), ("val200", 9), ("test", 12)):
        for i in range(count):
            label = i % 3
            pixels = np.clip(np.array(colours[label]) + rng.integers(-20, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            name = f"images/{split}_{i}.png"
            Image.fromarray(pixels).save(root / name)
            lines[split].append(f"{name} {label}")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (root / "train800val200.txt").write_text("\n".join(lines["train800"] + lines["val200"]) + "\n")
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    return root


def needs_real(*tasks: str, backbone: str = "dinov2-small") -> pytest.MarkDecorator:
    """Skip unless the real weights and tasks are where the library looks for them (``$VPTUNE_WEIGHTS`` and
    ``$VPTUNE_DATA``, then ``../shared``); the skip reason says where it looked."""
    missing = [f"task {task} (looked in {data_home()})" for task in tasks if not (data_home() / task).is_dir()]
    if not Path(resolve_spec(backbone)).is_dir():
        places = ", ".join(str(root / SHORT_NAMES[backbone][0]) for root in weight_roots())
        missing.append(f"the {backbone} weights (looked in {places})")
    return pytest.mark.skipif(bool(missing), reason="needs " + "; ".join(missing))
