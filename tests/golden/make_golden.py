"""Write the reference tensors of ``test_golden.py``: one ``vptune train``, ``demo`` and ``sweep`` run each on a tiny
saved DINOv2 and a tiny colour task, through the command line.

The files were first written at commit b8c8f76, before the "One house" restructuring, and held the restructured code
to them (it matched within 1e-6). They were written again, on purpose, with the released code's details of issue 16
(per-sample prompt dropout, weight decay spared on the head's bias, the head's batch norm), and again for issue 18:
``demo --epochs 1`` now warms up for a tenth of the run instead of all of it (the code with a warmup of 0.999 epochs
matched the old files exactly). Rerun it only for a
deliberate change of what training computes, and say so in the commit: ``python tests/golden/make_golden.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
BACKBONE = HERE / "tiny-dinov2"


def tiny_backbone_folder() -> Path:
    """The tiny DINOv2 is stored here, so that a later transformers' initialisation cannot change it."""
    if not (BACKBONE / "config.json").is_file():
        from transformers import Dinov2Config, Dinov2Model

        torch.manual_seed(0)
        config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=16)
        Dinov2Model(config).save_pretrained(BACKBONE)
    return BACKBONE


def colour_task(root: Path) -> Path:
    """Three noisy colour classes in the VTAB-1k list layout (24 train, 9 val, 12 test images)."""
    (root / "images").mkdir(parents=True)
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


def commands(task: Path, out: Path) -> dict[str, list[str]]:
    """The three runs, by the name their reference files carry."""
    common = ["--data", str(task), "--backbone", f"hf:{tiny_backbone_folder()}"]
    return {
        "train": ["train", *common, "--image-size", "16", "--method", "vpt-deep", "--num-tokens", "3", "--epochs", "2",
                  "--warmup-epochs", "1", "--batch-size", "8", "--base-lr", "1", "--no-progress",
                  "--out", str(out / "train")],
        "demo": ["demo", *common, "--image-size", "16", "--epochs", "1", "--methods", "linear,vpt-shallow,lora",
                 "--out", str(out / "demo")],
        "sweep": ["sweep", *common, "--method", "vpt-shallow", "--budget", "smoke", "--lr", "0.5,0.1", "--wd", "0",
                  "--seeds", "1", "--no-progress", "--out", str(out / "sweep")],
    }  # fmt: skip


def trained_folders(out: Path) -> dict[str, Path]:
    """Each task folder the runs wrote, by reference name."""
    folders = {"train": out / "train"}
    folders.update({f"demo-{m}": out / "demo" / m for m in ("linear", "vpt-shallow", "lora")})
    final = json.loads((out / "sweep" / "sweep.json").read_text())["runs"][-1]
    folders["sweep"] = out / "sweep" / "tasks" / final
    return folders


def main() -> int:
    from vptune.cli import main as vptune

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        task, out = colour_task(tmp / "colors"), tmp / "out"
        for argv in commands(task, out).values():
            assert vptune(argv) == 0, argv
        for name, folder in trained_folders(out).items():
            save_file(load_file(folder / "weights.safetensors"), HERE / f"{name}.safetensors")
        grid = json.loads((out / "sweep" / "sweep.json").read_text())["grid"]
        (HERE / "sweep-grid.json").write_text(json.dumps(grid, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
