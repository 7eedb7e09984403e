"""Write the task folders of ``test_legacy.py``: tasks saved by vptune before the "One way in" restructuring (commit
6b76526), each with the logits it gave on fixed inputs, to check that such files keep loading to the same model.

Run once, with the code of that commit: ``python tests/legacy/make_legacy.py`` (it stores the tiny backbones it
needs beside the tasks, so that a later transformers cannot change them). Never rerun it with later code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import ResNetConfig, ResNetModel, SwinConfig, SwinModel

import vptune
from vptune.preprocessing import Preprocessing
from vptune.prompts import PromptConfig

HERE = Path(__file__).resolve().parent
GOLDEN_BACKBONE = HERE.parent / "golden" / "tiny-dinov2"  # a tiny DINOv2 stored for test_golden.py

# name: (backbone folder, method, prompt options or None, build options)
TASKS = {
    "dinov2-vpt-deep": ("dinov2", "vpt-deep", {"num_tokens": 3, "dropout": 0.1}, {}),
    "dinov2-vpt-shallow-image": ("dinov2", "vpt-shallow", {"num_tokens": 2, "readout": "image"}, {}),
    "dinov2-vpt-deep+kv+fourier": (
        "dinov2",
        "vpt-deep+kv+fourier",
        {"num_tokens": 4, "kv_tokens": 2, "fourier": 0.5, "dropout": 0.1},
        {},
    ),
    "dinov2-linear": ("dinov2", "linear", None, {}),
    "dinov2-mlp-2": ("dinov2", "mlp-2", None, {}),
    "dinov2-lora": ("dinov2", "lora", None, {"rank": 2}),
    "dinov2-concat-channel": ("dinov2", "vpt-shallow", {"num_tokens": 1, "location": "concat-channel"}, {}),
    "resnet-vpt-shallow-pad": ("resnet", "vpt-shallow", {"num_tokens": 2}, {}),
    "resnet-below": ("resnet", "vpt-shallow", {"num_tokens": 2, "location": "below"}, {}),
    "resnet-linear": ("resnet", "linear", None, {}),
    "swin-vpt-deep": ("swin", "vpt-deep", {"num_tokens": 2, "dropout": 0.0}, {}),
    # normalised with the task's own mean and std, not the backbone's
    "dinov2-own-normalisation": ("dinov2", "vpt-deep", {"num_tokens": 2}, {"preprocessing": "own"}),
}
OWN = {"mean": (0.2, 0.3, 0.4), "std": (0.5, 0.6, 0.7)}
SIZE = 16


def backbone_folder(kind: str) -> Path:
    """The tiny backbone of ``kind``, saved once as a transformers folder."""
    if kind == "dinov2":
        return GOLDEN_BACKBONE
    folder = HERE / f"tiny-{kind}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        if kind == "resnet":
            model = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
        else:
            config = SwinConfig(
                image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=2
            )
            model = SwinModel(config)
        with torch.no_grad():  # random biases and statistics, so that a dropped one would show
            for name, tensor in model.state_dict().items():
                if name.endswith(("bias", "running_mean")):
                    tensor.normal_(0.0, 0.2)
        model.save_pretrained(folder)
    return folder


def main() -> int:
    inputs = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for name, (kind, method, prompt, options) in TASKS.items():
        options = dict(options)
        backbone = vptune.load_backbone(f"hf:{backbone_folder(kind)}")
        config = PromptConfig(**prompt) if prompt is not None else None
        if options.pop("preprocessing", None) == "own":
            options["preprocessing"] = Preprocessing(SIZE, OWN["mean"], OWN["std"])
        model = vptune.build(method, backbone, 3, config, SIZE, seed=1, classes=["a", "b", "c"], **options)
        with torch.no_grad():  # trained-looking tensors: moved away from their start
            for tensor in model.task_state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(0.05 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(2)))
        model.eval()
        folder = vptune.save_task(model, HERE / name)
        with torch.no_grad():
            logits = model(inputs)
        save_file({"inputs": inputs, "logits": logits}, str(folder / "expected.safetensors"))
        print(f"{name}: {model.method}, {sorted(model.task_state_dict())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
