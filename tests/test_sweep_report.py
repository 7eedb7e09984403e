"""A sweep's report: the seed-0 final model copied to best/ (a working task folder), its per-class accuracy and
confusion matrix on test, report.md/report.json and the figures."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vptune
import vptune.sweep.executors
from vptune.cli import main
from vptune.multitask import MultiTask
from vptune.sweep import Budget, plan_sweep, run_sweep
from vptune.sweep.report import (
    NO_MATPLOTLIB,
    confusion_matrix,
    grid_score,
    per_class_accuracy,
    plot_confusion,
    plot_per_class,
    report_markdown,
    save_figure,
    top_confusions,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"
TINY = Budget("tiny", image_size=16, epochs=2, warmup_epochs=1, batch_size=8, seeds=2, wds=(0.0,), note="test")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, saved_backbone, tiny_task) -> tuple[Path, dict]:
    """One sweep: a 2-setting grid, 2 final seeds (their weights differ, so a wrong seed in best/ shows)."""
    out = tmp_path_factory.mktemp("swept")
    return out, run_sweep(tiny_plan(str(tiny_task), saved_backbone), out)


def tiny_plan(task: str, backbone: str) -> vptune.sweep.SweepPlan:
    return plan_sweep(task, "vpt-shallow", TINY, backbone, lrs=[2.0, 0.5], num_tokens=[2])


def finals(out: Path, summary: dict) -> dict[int, Path]:
    """The final runs' task folders by seed."""
    folders = {}
    for run_id in summary["runs"]:
        entry = json.loads((out / "runs" / f"{run_id}.json").read_text())["entry"]
        if entry["stage"] == "final":
            folders[entry["run"]["train"]["seed"]] = out / "tasks" / run_id
    return folders


def test_best_is_the_seed_0_final_run_of_the_chosen_setting(swept) -> None:
    out, summary = swept
    folders = finals(out, summary)
    assert sorted(folders) == [0, 1]
    weights = {seed: (folder / "weights.safetensors").read_bytes() for seed, folder in folders.items()}
    assert weights[0] != weights[1]  # the seeds differ: a copy of the wrong one would show
    assert (out / "best" / "weights.safetensors").read_bytes() == weights[0]
    record = vptune.read_record(out / "best")
    assert record["train_config"]["seed"] == 0 and record["train_config"]["base_lr"] == summary["choice"]["base_lr"]
    report = json.loads((out / "report.json").read_text())
    assert report["best"]["seed"] == 0 and report["best"]["copied_from"] == f"tasks/{folders[0].name}"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".best")]  # no staging folder left behind


def predicted_by_cli(folder: Path, task: Path, capsys) -> tuple[list[int], list[int]]:
    """The test images' labels, and the classes `vptune predict` gives them one at a time, from their files."""
    pairs = [line.split() for line in (task / "test.txt").read_text().splitlines() if line]
    capsys.readouterr()
    assert main(["predict", str(folder), *[str(task / name) for name, _ in pairs], "--top-k", "1", "--json"]) == 0
    classes = (task / "classes.txt").read_text().split()
    answers = json.loads(capsys.readouterr().out)
    return [int(label) for _, label in pairs], [classes.index(answer["top"][0]["class"]) for answer in answers]


def test_per_class_accuracy_and_confusion_agree_with_predict(swept, tiny_task, capsys) -> None:
    out, _ = swept
    report = json.loads((out / "report.json").read_text())
    confusion, classes = report["confusion"], report["classes"]
    assert classes == ["red", "green", "blue"]
    assert [sum(row) for row in confusion] == [4, 4, 4]  # the tiny task's 12 test images, 4 per class
    recorded = vptune.read_record(out / "best")["metrics"]["test_accuracy"]
    trace = sum(confusion[i][i] for i in range(3))
    assert trace / 12 == pytest.approx(recorded) and report["test_accuracy"] == pytest.approx(recorded)
    assert confusion == confusion_matrix(*predicted_by_cli(out / "best", tiny_task, capsys), 3)
    for row in report["per_class"]:
        assert row["images"] == 4 and row["accuracy"] == pytest.approx(confusion[row["index"]][row["index"]] / 4)


def test_the_confusion_of_a_model_that_never_answers_blue(swept, tiny_task, tmp_path, capsys) -> None:
    """The tiny task is easy (a diagonal matrix); a head whose blue logit is always the green one minus 1 errs."""
    out, summary = swept
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.png", "report.*", "best"))
    weights = finals(copy, summary)[0] / "weights.safetensors"
    with safe_open(weights, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(weights)
    weight, bias = tensors["head.weight"][0], tensors["head.bias"][0]  # (classes, width), (classes,)
    weight[2], bias[2] = weight[1], bias[1] - 1.0
    save_file(tensors, weights, metadata=metadata)
    report = write_report(summary, copy)
    confusion = report["confusion"]
    assert [sum(row) for row in confusion] == [4, 4, 4] and [row[2] for row in confusion] == [0, 0, 0]
    assert confusion == confusion_matrix(*predicted_by_cli(copy / "best", tiny_task, capsys), 3)
    assert [row["accuracy"] for row in report["per_class"]][2] == 0.0
    assert report["top_confusions"][0]["true"] == "blue" and report["top_confusions"][0]["errors"] == 4
    assert main(["eval", str(copy / "best"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(report["test_accuracy"])
    assert report["test_accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / 12)
    assert report["test_accuracy"] <= 8 / 12
    assert "| blue | " in (copy / "report.md").read_text()


def test_best_works_with_eval_load_task_and_serving(swept, tiny_task, capsys) -> None:
    out, _ = swept
    capsys.readouterr()
    assert main(["eval", str(out / "best"), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert scored["count"] == 12 and scored["accuracy"] == pytest.approx(report["test_accuracy"])
    model = vptune.load_task(out / "best")
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    served = MultiTask(model.backbone, [out / "best"])
    assert served.names == ["best"]


def test_report_md_names_the_choice_and_links_the_figures(swept) -> None:
    out, summary = swept
    text = (out / "report.md").read_text()
    choice = summary["choice"]
    assert f"Chosen: base lr {choice['base_lr']:g}, weight decay {choice['weight_decay']:g}, 2 prompt tokens" in text
    assert f"{100 * summary['test_mean']:.2f} ± {100 * summary['test_std']:.2f}" in text
    assert "`best/` is a copy of" in text and "seed 0" in text and "would let the test split into the choice" in text
    assert "| red | 4 |" in text and f"{summary['seconds']:.1f} s" in text
    chosen_rows = [line for line in text.splitlines() if line.endswith("| **chosen** |")]
    assert len(chosen_rows) == 1 and chosen_rows[0].startswith(f"| {choice['base_lr']:g} |")
    for name in ("grid.png", "per_class.png", "confusion.png"):
        assert f"]({name})" in text
        assert (out / name).read_bytes()[:8] == PNG


def test_a_rerun_rewrites_best_identically(swept, saved_backbone, tiny_task, monkeypatch) -> None:
    out, summary = swept
    before = {p.name: p.read_bytes() for p in (out / "best").iterdir()}
    report = (out / "report.json").read_text()
    (out / "best" / "weights.safetensors").write_bytes(b"damaged")  # the rerun replaces it whole
    plan = tiny_plan(str(tiny_task), saved_backbone)
    monkeypatch.setattr(vptune.sweep.executors, "execute", lambda entry: pytest.fail(f"{entry['id']} ran again"))
    assert run_sweep(plan, out) == summary
    assert {p.name: p.read_bytes() for p in (out / "best").iterdir()} == before
    assert (out / "report.json").read_text() == report


def test_without_matplotlib_the_report_says_so(swept, tmp_path, monkeypatch) -> None:
    out, summary = swept
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.png", "report.*", "best"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.warns(UserWarning, match="no figures"):
        report = write_report(summary, copy)
    assert report["figures"] == [] and not list(copy.glob("*.png"))
    assert f"No figure (per-class accuracy): {NO_MATPLOTLIB}" in (copy / "report.md").read_text()
    assert (copy / "best" / "weights.safetensors").is_file()


def test_counts_per_class_and_top_confusions() -> None:
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    predicted = [0, 1, 1, 1, 0, 2, 0, 1, 1]
    confusion = confusion_matrix(labels, predicted, 4)
    assert confusion == [[1, 2, 0, 0], [1, 1, 0, 0], [1, 2, 1, 0], [0, 0, 0, 0]]
    rows = per_class_accuracy(confusion, ["a", "b", "c", "d"])
    assert [row["accuracy"] for row in rows] == [pytest.approx(1 / 3), 0.5, 0.25, None]
    top = top_confusions(confusion, ["a", "b", "c", "d"], limit=3)
    assert [(t["true"], t["predicted"], t["errors"]) for t in top] == [("a", "b", 2), ("c", "b", 2), ("b", "a", 1)]
    assert top[1]["share_of_true"] == 0.5


def test_grid_rows_show_stopped_and_diverged_settings() -> None:
    assert grid_score({"val_accuracy": 0.5, "pruned_at_epoch": 3}) == "stopped at epoch 3 (val 50.00)"
    assert grid_score({"val_accuracy": None}) == "diverged" and grid_score({"val_accuracy": 0.25}) == "25.00"
    setting = {"base_lr": 0.1, "weight_decay": 0.0, "num_tokens": None}
    stopped = {"entry": {"stage": "grid", "setting": setting}, "metrics": {"val_accuracy": 0.4, "pruned_at_epoch": 2}}
    result = {
        "method": "linear", "data": "/x/colors", "backbone": "b", "budget": {"name": "tiny", "note": "test"},
        "choice": {**setting, "base_lr": 0.5}, "chosen_by": "val", "seeds": 1, "test_accuracy": [0.5],
        "test_mean": 0.5, "test_std": 0.0, "seconds": 1.0,
    }  # fmt: skip
    report = {
        "classes": ["a"], "best": {"seed": 0, "copied_from": "tasks/x", "recorded_test_accuracy": 0.5},
        "test_accuracy": 0.5, "test_images": 2, "per_class": [], "top_confusions": [], "figures": [],
        "figures_skipped": NO_MATPLOTLIB,
    }  # fmt: skip
    assert "| 0.1 | 0 | - | stopped at epoch 2 (val 40.00) |  |" in report_markdown(result, [stopped], report)


def test_figures_for_many_classes(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    names = [f"class{i}" for i in range(120)]
    confusion = [[(5 if i == j else 0) + (i % 3 if j == (i + 1) % 120 else 0) for j in range(120)] for i in range(120)]
    figure = plot_per_class(per_class_accuracy(confusion, names))
    assert len(figure.axes[0].patches) == 30 and "30 worst of 120" in figure.axes[0].get_title()
    save_figure(figure, tmp_path / "per_class.png")
    figure = plot_confusion(confusion, names)
    assert figure.axes[0].get_xticklabels() == []
    save_figure(figure, tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == PNG
    few = plot_confusion([[1, 0], [1, 1]], ["x", "y"])
    assert [label.get_text() for label in few.axes[0].get_xticklabels()] == ["x", "y"]
