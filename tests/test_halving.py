"""Successive halving of a sweep's grid (a budget with ``halving``, Optuna): bad settings stop early, the choice is
a setting that finished, the same sweep gives the same stops, and a resumed sweep the same as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

import vptune
import vptune.runs
import vptune.sweep.halving
from vptune.cli import main
from vptune.config import to_dict
from vptune.sweep import BUDGETS, Budget, choose, make_executor, plan_sweep, run_sweep
from vptune.sweep.halving import halving_order
from vptune.sweep.plan import Halving

pytest.importorskip("optuna")

# 4 epochs; the pruner is asked after epochs 1, 2 and 3 (rungs at 1, 2 and 4: never after the last epoch).
HALVING = Budget(
    "tiny-halving", image_size=16, epochs=4, warmup_epochs=0, batch_size=8, seeds=1, wds=(0.0,),
    halving=Halving(min_epochs=1, reduction_factor=2), note="test",
)  # fmt: skip
# Three lrs too small to move the head off chance (1/3 on the three colours), three that learn the task.
LRS = [1e-5, 2e-5, 4e-5, 0.5, 1.0, 2.0]


def grid_files(out: Path) -> dict[str, dict]:
    """The grid runs' results as written, by run id, without their timings."""
    files = {path.stem: json.loads(path.read_text()) for path in (out / "runs").glob("grid-*.json")}
    for result in files.values():
        result.pop("seconds", None)
        for timing in ("seconds", "val_seconds"):
            result["metrics"].pop(timing, None)
    return files


def stops(out: Path) -> dict[str, int | None]:
    """Each grid run's stop epoch (None: it finished)."""
    return {run_id: result["metrics"].get("pruned_at_epoch") for run_id, result in grid_files(out).items()}


@pytest.fixture
def plan(saved_backbone, tiny_task):
    return plan_sweep(str(tiny_task), "linear", HALVING, saved_backbone, lrs=LRS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, saved_backbone, tiny_task) -> tuple[dict, Path]:
    """One uninterrupted sweep, for the others to compare with."""
    out = tmp_path_factory.mktemp("halving") / "reference"
    plan = plan_sweep(str(tiny_task), "linear", HALVING, saved_backbone, lrs=LRS)
    return run_sweep(plan, out, report=False), out


def test_bad_settings_stop_early_and_the_choice_finished(reference, plan) -> None:
    summary, out = reference
    runs = grid_files(out)
    order = [plan.grid_runs()[i]["id"] for i in halving_order(plan.grid_runs())]
    assert set(runs) == set(order) and len(order) == len(LRS)
    stopped = {run_id: epoch for run_id, epoch in stops(out).items() if epoch is not None}
    assert stopped and all(epoch < HALVING.epochs for epoch in stopped.values())
    assert stops(out)[order[0]] is None  # the first run has nothing to lose to: it always finishes
    for run_id, result in runs.items():
        metrics = result["metrics"]
        assert len(metrics["val_by_epoch"]) == metrics.get("pruned_at_epoch", HALVING.epochs)
        assert metrics["val_accuracy"] == metrics["val_by_epoch"][-1]
        assert result["halving"] == {"min_epochs": 1, "reduction_factor": 2, "order": order}
        assert result["entry"]["setting"]["base_lr"] >= 0.5 or metrics["val_accuracy"] < 0.5, run_id
    for run_id in stopped:
        assert runs[run_id]["entry"]["setting"]["base_lr"] < 0.5  # only the lrs that cannot learn were stopped
    chosen = next(r for r in runs.values() if r["entry"]["setting"] == summary["choice"])
    assert "pruned_at_epoch" not in chosen["metrics"] and summary["choice"]["base_lr"] >= 0.5
    rows = {row["setting"]["base_lr"]: row for row in summary["grid"]}
    assert {lr for lr, row in rows.items() if "pruned_at_epoch" in row} == {
        r["entry"]["setting"]["base_lr"] for r in runs.values() if "pruned_at_epoch" in r["metrics"]
    }
    assert "successive halving" in summary["chosen_by"] and summary["budget"]["halving"]["reduction_factor"] == 2
    assert "stopped at epoch" in (out / "summary.md").read_text()


def test_the_same_sweep_twice_stops_and_chooses_the_same(reference, plan, tmp_path) -> None:
    summary, out = reference
    again = run_sweep(plan, tmp_path / "again", report=False)
    assert again["choice"] == summary["choice"] and again["grid"] == summary["grid"]
    assert grid_files(tmp_path / "again") == grid_files(out)


def test_a_deleted_result_runs_again_alone_with_the_same_stop(reference, plan, tmp_path, monkeypatch) -> None:
    summary, out = reference
    order = [plan.grid_runs()[i]["id"] for i in halving_order(plan.grid_runs())]
    stopped = [run_id for run_id in order if stops(out)[run_id] is not None]
    copy = tmp_path / "copy"
    (copy / "runs").mkdir(parents=True)
    for path in (out / "runs").iterdir():
        (copy / "runs" / path.name).write_bytes(path.read_bytes())
    (copy / "runs" / f"{stopped[-1]}.json").unlink()  # a stopped run in the middle of the order
    (copy / "runs" / f"{order[-1]}.json").unlink()  # and the last run
    trained = _count_runs(monkeypatch)
    seen: list[dict] = []
    resumed = run_sweep(plan, copy, progress=seen.append, report=False)
    assert sorted(trained) == sorted({stopped[-1], order[-1]})  # the others were replayed, not trained
    assert sum(bool(r.get("resumed")) for r in seen if r["entry"]["stage"] == "grid") == len(order) - 2
    assert resumed["choice"] == summary["choice"] and resumed["grid"] == summary["grid"]
    assert grid_files(copy) == grid_files(out)


def test_an_interrupted_sweep_resumes_to_the_same_stops(reference, plan, tmp_path, monkeypatch) -> None:
    """Interrupted after two runs: the third, the first to run after the resume, is stopped as it was in the
    uninterrupted sweep, which only a study that holds the two runs before it can do."""
    summary, out = reference
    order = [plan.grid_runs()[i]["id"] for i in halving_order(plan.grid_runs())]
    assert stops(out)[order[2]] is not None  # the grid is such that the third run is stopped
    real = vptune.runs.run
    calls: list[str] = []

    def interrupted(spec, *args, **kwargs):
        calls.append(spec.train.base_lr)
        if len(calls) > 2:
            raise KeyboardInterrupt  # as if stopped with Ctrl-C during the third run
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(vptune.sweep.halving, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, tmp_path, report=False)
    assert sorted(grid_files(tmp_path)) == sorted(order[:2])
    monkeypatch.setattr(vptune.sweep.halving, "run", real)
    trained = _count_runs(monkeypatch)
    resumed = run_sweep(plan, tmp_path, report=False)
    assert sorted(trained) == sorted(order[2:])
    assert resumed["choice"] == summary["choice"] and grid_files(tmp_path) == grid_files(out)


def test_a_result_from_another_halving_runs_again(reference, saved_backbone, tiny_task, tmp_path, monkeypatch) -> None:
    """Stops depend on the halving and the order: results written under other ones are not reused."""
    _, out = reference
    (tmp_path / "runs").mkdir()
    for path in (out / "runs").glob("grid-*.json"):
        (tmp_path / "runs" / path.name).write_bytes(path.read_bytes())
    other = dataclasses.replace(HALVING, halving=Halving(min_epochs=1, reduction_factor=3))
    trained = _count_runs(monkeypatch)
    run_sweep(plan_sweep(str(tiny_task), "linear", other, saved_backbone, lrs=LRS), tmp_path, report=False)
    assert len(trained) == len(LRS)
    assert {r["halving"]["reduction_factor"] for r in grid_files(tmp_path).values()} == {3}


def test_a_diverged_run_fails_in_the_study_and_loses(saved_backbone, tiny_task, tmp_path, monkeypatch) -> None:
    real_fit = vptune.runs.fit

    def fit(model, data, config, *args, on_epoch_end=None, **kwargs):
        def end(metrics: dict) -> None:
            if config.base_lr == 0.25 and metrics["epoch"] == 2:
                raise vptune.TrainingDiverged("loss became nan at epoch 2, step 1")
            if on_epoch_end is not None:
                on_epoch_end(metrics)

        return real_fit(model, data, config, *args, on_epoch_end=end, **kwargs)

    monkeypatch.setattr(vptune.runs, "fit", fit)
    plan = plan_sweep(str(tiny_task), "linear", HALVING, saved_backbone, lrs=[0.25, *LRS])
    summary = run_sweep(plan, tmp_path / "one", report=False)
    diverged = grid_files(tmp_path / "one")["grid-lr0.25-wd0-s0"]["metrics"]
    assert diverged["val_accuracy"] is None and "loss became nan" in diverged["diverged"]
    assert len(diverged["val_by_epoch"]) == 1  # the epoch it finished, reported before it diverged
    assert summary["choice"]["base_lr"] != 0.25
    for run_id in stops(tmp_path / "one"):  # resumed from any point, the same stops
        copy = tmp_path / run_id
        (copy / "runs").mkdir(parents=True)
        for path in (tmp_path / "one" / "runs").glob("grid-*.json"):
            if path.stem != run_id:
                (copy / "runs" / path.name).write_bytes(path.read_bytes())
        run_sweep(plan, copy, report=False)
        assert grid_files(copy) == grid_files(tmp_path / "one"), run_id


def test_choose_ranks_stopped_runs_below_finished_ones() -> None:
    def result(lr: float, val: float | None, stopped: int | None = None) -> dict:
        metrics = {"val_accuracy": val} | ({"pruned_at_epoch": stopped} if stopped else {})
        return {"entry": {"setting": {"base_lr": lr, "weight_decay": 0.0, "num_tokens": None}}, "metrics": metrics}

    assert choose([result(0.1, 0.9, stopped=2), result(0.5, 0.6)])["base_lr"] == 0.5  # stopped: loses at any val
    assert choose([result(0.1, 0.6, stopped=2), result(0.5, 0.6)])["base_lr"] == 0.5  # equal: the finished one
    assert choose([result(0.1, 0.9, stopped=2), result(0.5, 0.3, stopped=4)])["base_lr"] == 0.5  # went further
    assert choose([result(0.1, 0.5, stopped=2), result(0.5, 0.5, stopped=2)])["base_lr"] == 0.1  # then smaller lr
    assert choose([result(0.1, None), result(0.5, 0.1, stopped=1)])["base_lr"] == 0.5  # diverged: below all


def test_halving_needs_the_local_executor(plan, tmp_path, tiny_task, saved_backbone, capsys) -> None:
    for execute in (make_executor(batched=2), make_executor("ray")):
        refusal = r"successive halving.*one run at a time.*drop --backend ray and --batched"
        with pytest.raises(ValueError, match=refusal):
            run_sweep(plan, tmp_path / "out", execute)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    single = plan_sweep(str(tiny_task), "linear", HALVING, saved_backbone, lrs=[0.5])
    assert run_sweep(single, tmp_path / "single", make_executor(batched=2), report=False)["seeds"] == 1  # no grid
    argv = ["sweep", "--data", str(tiny_task), "--method", "linear", "--backbone", saved_backbone]
    assert main([*argv, "--budget", "cpu-tune", "--batched", "3", "--out", str(tmp_path / "cli"), "--no-progress"]) == 1
    assert "budget 'cpu-tune' stops grid runs early by successive halving" in capsys.readouterr().err


def test_halving_without_optuna_says_how_to_get_it(plan, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"pip install 'vptune\[tune\]'"):
        run_sweep(plan, tmp_path, report=False)


def test_cpu_tune_budget() -> None:
    budget = BUDGETS["cpu-tune"]
    assert (budget.image_size, budget.epochs, budget.warmup_epochs, budget.batch_size, budget.seeds) == (
        112, 6, None, 32, 1
    )  # fmt: skip
    assert budget.halving == Halving(min_epochs=2, reduction_factor=3) and "vpt-deep 19.5 minutes" in budget.note
    grids = {
        "vpt-deep": [0.025, 0.05, 0.1, 0.2, 0.4],
        "linear": [0.1, 0.2, 0.4, 0.8, 1.6],  # trains only a head: the head-only lrs
        "full": [0.00025, 0.0005, 0.001],  # AdamW
    }
    for method, lrs in grids.items():
        plan = plan_sweep("eurosat", method, "cpu-tune")
        assert [s["base_lr"] for s in plan.settings] == lrs and {s["weight_decay"] for s in plan.settings} == {1e-4}
        assert len(plan.grid_runs()) == len(lrs) and plan.seeds == 1
        train = plan.grid_runs()[0]["run"]["train"]
        assert train["warmup_epochs"] is None and train["epochs"] == 6 and train["batch_size"] == 32
    keys = ["name", "image_size", "epochs", "warmup_epochs", "batch_size", "seeds", "sgd_lrs", "adamw_lrs", "wds"]
    keys += ["head_only_lrs", "num_tokens", "note", "halving", "epoch_steps"]
    for name in ("smoke", "cpu", "paper"):  # the old budgets in sweep.json: the same, halving and epoch_steps null
        assert list(to_dict(BUDGETS[name])) == keys and to_dict(BUDGETS[name])["halving"] is None
        assert to_dict(BUDGETS[name])["epoch_steps"] is None
    assert to_dict(BUDGETS["cpu"])["head_only_lrs"] == [0.4, 0.2, 0.1, 0.05] and BUDGETS["cpu"].epochs == 8


def _count_runs(monkeypatch) -> list[str]:
    """The grid runs trained from now on (by id), counted where halving trains them."""
    trained: list[str] = []
    real = vptune.sweep.halving.run

    def counted(spec, *args, **kwargs):
        setting = {"base_lr": spec.train.base_lr, "weight_decay": spec.train.weight_decay}
        trained.append(f"grid-lr{setting['base_lr']:g}-wd{setting['weight_decay']:g}-s{spec.train.seed}")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(vptune.sweep.halving, "run", counted)
    return trained
