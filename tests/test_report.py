"""report.py directly: sizes, the paper's "total params", the inspect summary, tables, top-k answers."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE, tiny_backbone

import vptune
from vptune.report import file_bytes, human_bytes, markdown_table, params_multiple, task_summary, top_classes


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 2**20, "5.0 MiB"), (3 * 2**40, "3072.0 GiB")],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_params_multiple_is_the_papers_total_params() -> None:
    record = {"backbone": {"parameters": 1000, "tuned_parameters": 0}, "trainable_parameters": 10}
    assert params_multiple(record, 24) == pytest.approx((1000 + 24 * 10) / 1000)
    full = {"backbone": {"parameters": 1000, "tuned_parameters": 1000}, "trainable_parameters": 1010}
    assert params_multiple(full, 24) == pytest.approx(24 * 1010 / 1000)  # nothing shared: 24.24x


def test_summary_of_a_saved_task(tmp_path) -> None:
    model = vptune.build("vpt-deep", tiny_backbone("vit"), 3, vptune.PromptConfig(num_tokens=2), IMAGE)
    vptune.save_task(model, tmp_path, metrics={"val_accuracy": 0.5, "train_loss": 1.0, "epoch": 3})
    record = vptune.read_record(tmp_path)
    summary = task_summary(record, tmp_path)
    backbone = model.backbone.num_parameters()
    assert summary["trainable_parameters"] == model.num_trainable() == 3 * 2 * 32 + 32 * 3 + 3
    assert summary["percent_of_backbone"] == round(100 * model.num_trainable() / backbone, 4)
    assert summary["file_bytes"] == file_bytes(tmp_path) == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert summary["prompt"] == "2 tokens, deep, prepend, readout cls" and summary["image_size"] == IMAGE
    assert summary["metrics"] == {"val_accuracy": 0.5, "epoch": 3}  # accuracies and the epoch, not the loss
    assert summary["total_params_24_tasks"] == f"{params_multiple(record):.2f}x"


def test_markdown_table() -> None:
    assert markdown_table([]) == ""
    assert markdown_table([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]) == "| a | b |\n|---|---|\n| 1 | x |\n| 2 | y |"


def test_top_classes() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    assert top_classes(probs, ["a", "b", "c"], 2) == [
        {"class": "b", "label": 1, "probability": 0.6},
        {"class": "c", "label": 2, "probability": 0.3},
    ]
    assert [entry["label"] for entry in top_classes(probs, ["a", "b", "c"], 10)] == [1, 2, 0]
