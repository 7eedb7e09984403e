"""``vptune train``, ``demo`` and ``sweep`` train the tensors stored in ``tests/golden/`` (see make_golden.py for when
they were written and why): a change of what training computes shows here. The runs repeat its commands on the same
tiny stored backbone and task.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vptune.cli import main

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("golden")
    task, out = make_golden.colour_task(tmp / "colors"), tmp / "out"
    for argv in make_golden.commands(task, out).values():
        assert main(argv) == 0, argv
    return out


@pytest.mark.parametrize("name", ["train", "demo-linear", "demo-vpt-shallow", "demo-lora", "sweep"])
def test_same_trained_tensors_as_before(runs: Path, name: str) -> None:
    reference = load_file(GOLDEN / f"{name}.safetensors")
    trained = load_file(make_golden.trained_folders(runs)[name] / "weights.safetensors")
    assert trained.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(trained[key], tensor, atol=1e-6, rtol=0, msg=f"{name}: {key}")


def test_same_sweep_grid_as_before(runs: Path) -> None:
    reference = json.loads((GOLDEN / "sweep-grid.json").read_text())
    assert json.loads((runs / "sweep" / "sweep.json").read_text())["grid"] == reference
