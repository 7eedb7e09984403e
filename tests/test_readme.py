"""README.md: at most ~200 lines, every link resolves, and its quick starts run as written.

The ```python blocks run in order in one namespace, and every command of the ```bash blocks runs through
``vptune.cli.main``, on a tiny DINOv2 and a tiny ``eurosat`` laid out as ``../shared`` is (``$VPTUNE_WEIGHTS``,
``$VPTUNE_DATA``). Blocks marked ```sh are the long runs and the server (the suite tests those elsewhere).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from vptune.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text()
CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", TEXT, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Each command of a shell block (continuation lines joined, comments dropped) as its arguments."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.split("#")[0].strip()]


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp/shared`` with a tiny backbone under the real one's folder name and a tiny eurosat; cwd ``tmp/work``."""
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=56)
    Dinov2Model(config).save_pretrained(tmp_path / "shared" / "weights" / "dinov2-small-imgfocus")
    task = tmp_path / "shared" / "data" / "eurosat"
    rng, lines = np.random.default_rng(0), {"train800": [], "val200": [], "test": []}
    for split, count in (("test", 6), ("train800", 12), ("val200", 6)):
        for i in range(count):
            label = i % len(CLASSES)
            name = f"images/{CLASSES[label]}/{CLASSES[label]}_{1013 + len(sum(lines.values(), []))}.jpg"
            (task / name).parent.mkdir(parents=True, exist_ok=True)
            colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label])
            pixels = np.clip(colour + rng.integers(-30, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(task / name)
            lines[split].append(f"{name} {label}")
    for split, rows in lines.items():
        (task / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (task / "train800val200.txt").write_text("\n".join(lines["train800"] + lines["val200"]) + "\n")
    (task / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    monkeypatch.setenv("VPTUNE_WEIGHTS", str(tmp_path / "shared" / "weights"))
    monkeypatch.setenv("VPTUNE_DATA", str(tmp_path / "shared" / "data"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path / "shared"


def test_readme_is_for_users() -> None:
    assert len(TEXT.splitlines()) <= 200
    assert TEXT.startswith("# vptune\n\n```sh\nmake demo") and "make test" in TEXT.splitlines()[4]
    for link in re.findall(r"\]\(([^)#]+)\)", TEXT):
        assert link.startswith("http") or (README.parent / link).exists(), link


def test_the_python_quick_start_runs(shared: Path, capsys) -> None:
    code = blocks("python")
    assert len(code) >= 3
    namespace: dict = {}
    for block in code:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102  (our own README)
    assert capsys.readouterr().out.count("truth:") == 1
    assert Path("runs/eurosat-deep/weights.safetensors").is_file() and len(namespace["logits"]) == 2


def test_the_command_line_quick_starts_run(shared: Path, capsys) -> None:
    lines = [argv for block in blocks("bash") for argv in commands(block)]
    assert [argv[:2] for argv in lines][:3] == [["vptune", "train"], ["vptune", "eval"], ["vptune", "predict"]]
    for argv in lines:
        assert argv[0] == "vptune" and main(argv[1:]) == 0, argv
    assert Path("runs/cli-deep-again/config.json").read_text() == Path("runs/cli-deep/config.json").read_text()
    assert "AnnualCrop" in capsys.readouterr().out
