"""Checks shared by tests/test_timm.py (real timm, where it installs) and tests/test_timm_fake.py (a stand-in for
timm's ViT layout, on any machine): every method on a timm ViT backbone, written once for both."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vptune
from vptune import MultiTask

CLASSES = 4
METHODS = (
    "linear", "mlp-2", "partial-1", "bias", "adapter", "lora-o", "full", "vpt-shallow", "vpt-deep", "vpt-deep+bias",
    "sidetune",
)  # fmt: skip


def pixels(backbone: vptune.Backbone, batch: int = 3, seed: int = 0, size: int | None = None) -> torch.Tensor:
    side = size or backbone.image_size
    return torch.randn(batch, backbone.in_chans, side, side, generator=torch.Generator().manual_seed(seed))


def make(method: str, backbone: vptune.Backbone, seed: int = 0, **kwargs) -> vptune.TaskModel:
    """``lora-o``: LoRA on the attention output only (timm's q, k and v are one fused layer)."""
    if method == "lora-o":
        method, kwargs = "lora", {**kwargs, "lora_targets": "o"}
    return vptune.build(method, backbone, CLASSES, image_size=backbone.image_size, seed=seed, **kwargs)


def expected_trainable(method: str, name: str, depth: int) -> bool:
    """Which tensors each method trains on a timm ViT, written out independently of the implementation."""
    if name.startswith("head."):
        return True
    backbone = name.startswith("backbone.")
    block = re.search(r"\.blocks\.(\d+)\.", name)
    rules = {
        "linear": False,
        "mlp-2": False,
        "partial-1": (block is not None and int(block[1]) == depth - 1) or name.startswith("backbone.model.norm."),
        "bias": backbone and name.endswith(".bias"),
        "adapter": ".adapter." in name,
        "lora-o": ".lora_" in name and ".attn.proj." in name,
        "vpt-shallow": name.startswith("prompts."),
        "vpt-deep": name.startswith("prompts."),
        "vpt-deep+bias": name.startswith("prompts.") or (backbone and name.endswith(".bias")),
        "sidetune": name.startswith("side.") or name == "blend",
        "full": backbone,
    }
    return rules[method]


def check_method(backbone: vptune.Backbone, method: str, folder: Path) -> None:
    """Only the method's tensors train; the shared backbone is untouched; save -> load gives identical logits; a
    sample's logits depend on nothing but the sample."""
    shared = {n: t.clone() for n, t in backbone.state_dict().items()}
    model = make(method, backbone, seed=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {
        n for n, _ in model.named_parameters() if expected_trainable(method, n, backbone.depth)
    }
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, labels = pixels(backbone, 6, seed=3), torch.arange(6) % CLASSES
    model.train()
    torch.manual_seed(0)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    after = model.state_dict()
    statistics = {n for n in after if ".running_" in n or "num_batches" in n}
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable | statistics)
    # (a key bias, here the k rows of the fused qkv bias, has an exact gradient of zero: only rounding moves it)
    assert any(not torch.equal(before[n], after[n]) for n in trainable)
    assert all(torch.equal(t, backbone.state_dict()[n]) for n, t in shared.items())

    model.eval()
    x = pixels(backbone, 4, seed=5)
    vptune.save_task(model, folder)
    loaded = vptune.load_task(folder, backbone=backbone)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert vptune.read_record(folder)["backbone"]["fingerprint"] == backbone.fingerprint()
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(model(x), alone, atol=1e-5, rtol=0)
        mixed = torch.cat([x[:1], pixels(backbone, 3, seed=9)])
        torch.testing.assert_close(model(mixed)[0], alone[0], atol=1e-5, rtol=0)


def check_prompts_change_the_output(backbone: vptune.Backbone, method: str) -> None:
    model, linear = make(method, backbone).eval(), make("linear", backbone).eval()
    linear.head.load_state_dict(model.head.state_dict())
    x = pixels(backbone)
    with torch.no_grad():
        assert (model(x) - linear(x)).abs().max() > 1e-3
        torch.testing.assert_close(model.backbone(x), linear.backbone(x), atol=0, rtol=0)  # the backbone alone: same


def check_lora_refuses_fused_qkv(backbone: vptune.Backbone) -> None:
    with pytest.raises(ValueError, match=r"fused Linear \(attn.qkv\).*lora_targets=o"):
        vptune.build("lora", backbone, CLASSES)


def check_multitask(backbone: vptune.Backbone, folder: Path) -> None:
    """Tasks of several methods on one timm backbone: each sample gets its own task's logits."""
    tasks = [make("vpt-deep", backbone, seed=s) for s in (0, 1)] + [
        make("vpt-shallow", backbone),
        make("linear", backbone),
    ]
    for index, task in enumerate(tasks):
        if task.prompts is not None:  # prompts far apart: a sample given another task's would show
            torch.nn.init.normal_(task.prompts.embeddings, 0.0, 0.5)
        vptune.save_task(task.eval(), folder / f"t{index}")
    served = MultiTask(backbone, [folder / f"t{i}" for i in range(4)])
    ids = torch.tensor([0, 1, 2, 3, 1, 0])
    x = pixels(backbone, 6, seed=4)
    with torch.no_grad():
        logits = served(x, ids)
        for row, index in enumerate(ids.tolist()):
            torch.testing.assert_close(logits[row], tasks[index](x[row : row + 1])[0], atol=1e-5, rtol=0)


def check_designs(backbone: vptune.Backbone, folder: Path) -> None:
    """Fourier and token-initialised prompts work on a timm ViT (train, reload exactly); key-value prompts, which
    need separate key and value projections, are refused with the reason."""
    from torch.utils.data import TensorDataset

    images = torch.randint(0, 256, (6, backbone.in_chans, backbone.image_size, backbone.image_size), dtype=torch.uint8)
    data = TensorDataset(images, torch.arange(6) % CLASSES)
    model = make("vpt-deep+fourier+tokens", backbone)
    before = model.prompts.embeddings.detach().clone()
    config = vptune.TrainConfig(epochs=1, batch_size=3, warmup_epochs=0, progress=False)
    vptune.fit(model, vptune.Splits(data), config)
    assert not model.prompts.tokens_pending and not torch.equal(before, model.prompts.embeddings)
    vptune.save_task(model.eval(), folder / "designs")
    loaded = vptune.load_task(folder / "designs", backbone=backbone).eval()
    x = pixels(backbone)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="separate key and value projections"):
        make("vpt-deep+kv", backbone)
