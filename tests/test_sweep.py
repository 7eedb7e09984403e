"""The protocol: grid on val, choice (ties -> smaller lr), seeds on test, resuming, the bench table and figures."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys

import pytest
from conftest import needs_real

import vptune
import vptune.sweep.executors
from vptune.bench import bench_table, collapses, plan_bench, run_bench
from vptune.cli import main
from vptune.sweep import (
    BUDGETS,
    Budget,
    SweepLocked,
    choose,
    make_executor,
    plan_sweep,
    run_sweep,
    summarise,
    summary_markdown,
)
from vptune.tools import bench_table as bench_table_tool

TINY = Budget("tiny", image_size=16, epochs=2, warmup_epochs=1, batch_size=8, seeds=2, wds=(0.0,), note="test")


def result(lr: float, wd: float, val: float | None) -> dict:
    setting = {"base_lr": lr, "weight_decay": wd, "num_tokens": None}
    return {"entry": {"setting": setting}, "metrics": {"val_accuracy": val}}


def test_choice_is_best_val_and_ties_go_to_the_smaller_lr() -> None:
    grid = [result(0.5, 0.0, 0.8), result(0.1, 0.0, 0.8), result(0.25, 0.0, 0.7), result(50, 0.0, None)]
    assert choose(grid)["base_lr"] == 0.1
    assert choose([result(0.5, 0.0, 0.9), result(0.1, 0.0, 0.8)])["base_lr"] == 0.5
    assert choose([result(0.1, 0.01, 0.8), result(0.1, 0.0, 0.8)])["weight_decay"] == 0.0


def test_budgets_and_grids() -> None:
    smoke = plan_sweep("eurosat", "vpt-deep", "smoke")
    assert len(smoke.grid_runs()) == 4 and smoke.seeds == 1  # 2 x 2
    paper = plan_sweep("eurosat", "vpt-deep", "paper")
    assert len(paper.settings) == 40 and paper.seeds == 5 and BUDGETS["paper"].image_size == 224
    assert plan_sweep("eurosat", "full", "paper").lrs == (0.005, 0.001, 0.0005, 0.0001)
    assert len(plan_sweep("eurosat", "linear", "cpu").settings) == 4  # head-only: a cheap grid
    assert len(plan_sweep("eurosat", "vpt-deep", "cpu").grid_runs()) == 2  # two lrs for the prompt methods
    assert plan_sweep("eurosat", "full", "cpu").grid_runs() == []  # one setting: nothing to score
    gpu = {method: plan_sweep("eurosat", method, "gpu") for method in ("linear", "vpt-deep", "vpt-deep+kv", "full")}
    assert gpu["linear"].lrs == (1.0, 0.5, 0.25, 0.1) and gpu["vpt-deep"].lrs == (0.5, 0.25, 0.1, 0.05)
    assert gpu["full"].lrs == (0.001, 0.0005) and gpu["vpt-deep+kv"].lrs == gpu["vpt-deep"].lrs  # one protocol
    run = gpu["vpt-deep"].grid_runs()[0]["run"]
    assert (run["image_size"], run["train"]["epochs"], run["train"]["warmup_epochs"]) == (224, 100, 10)
    assert all(plan.seeds == 3 and len(plan.grid_runs()) == len(plan.lrs) for plan in gpu.values())
    tokens = plan_sweep("eurosat", "vpt-deep", "smoke", lrs=[0.1], wds=[0.0], num_tokens=[1, 10, 50])
    assert [s["num_tokens"] for s in tokens.settings] == [1, 10, 50]
    assert {entry["run"]["prompt"]["num_tokens"] for entry in tokens.grid_runs()} == {1, 10, 50}
    final = tokens.final_runs(tokens.settings[1])
    assert final[0]["run"]["train"]["train_split"] == "trainval" and final[0]["run"]["train"]["test_split"] == "test"
    with pytest.raises(ValueError, match="has no prompts"):
        plan_sweep("eurosat", "linear", "smoke", num_tokens=[10])
    with pytest.raises(ValueError, match="seeds"):
        plan_sweep("eurosat", "linear", "smoke", seeds=0)


def test_sweep_runs_chooses_retrains_and_resumes(tmp_path, saved_backbone, tiny_task, monkeypatch) -> None:
    plan = plan_sweep(str(tiny_task), "vpt-shallow", TINY, saved_backbone, lrs=[2.0, 0.5], num_tokens=[2])
    out = tmp_path / "sweep"
    summary = run_sweep(plan, out)
    grid = {row["setting"]["base_lr"]: row["val_accuracy"] for row in summary["grid"]}
    best = max(grid.values())
    assert summary["choice"]["base_lr"] == min(lr for lr, val in grid.items() if val == best)
    assert len(summary["test_accuracy"]) == 2 and summary["seeds"] == 2
    assert summary["test_mean"] == pytest.approx(sum(summary["test_accuracy"]) / 2)
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["choice"] == summary["choice"] and (out / "summary.md").read_text().startswith("# vpt-shallow")
    for run_id in summary["runs"]:
        entry = json.loads((out / "runs" / f"{run_id}.json").read_text())["entry"]
        assert entry["id"] == run_id
    final = [r for r in summary["runs"] if r.startswith("final")]
    model = vptune.load_task(out / "tasks" / final[0])  # final runs keep reloadable task folders
    record = vptune.read_record(out / "tasks" / final[0])
    assert model.method == "vpt-shallow" and record["train_config"]["train_split"] == "trainval"

    calls: list[str] = []
    real = vptune.sweep.executors.execute
    monkeypatch.setattr(vptune.sweep.executors, "execute", lambda entry: calls.append(entry["id"]) or real(entry))
    assert run_sweep(plan, out)["test_accuracy"] == summary["test_accuracy"]
    assert calls == []  # everything was finished: nothing runs again
    (out / "runs" / f"{final[1]}.json").unlink()  # as if interrupted during the last run
    (out / "runs" / f"{final[0]}.json").write_text('{"spec": ')  # and a torn write
    assert run_sweep(plan, out)["test_accuracy"] == summary["test_accuracy"]  # same seed, same result on CPU
    assert sorted(calls) == sorted(final)


def test_diverged_grid_points_lose(tmp_path, saved_backbone, tiny_task, monkeypatch) -> None:
    import vptune.runs

    real_fit = vptune.runs.fit

    def fit(model, data, config, *args, **kwargs):
        if config.base_lr == 1e9:
            raise vptune.TrainingDiverged("loss became nan at epoch 1, step 1")
        return real_fit(model, data, config, *args, **kwargs)

    monkeypatch.setattr(vptune.runs, "fit", fit)
    plan = plan_sweep(str(tiny_task), "linear", TINY, saved_backbone, lrs=[1e9, 0.5], seeds=1)
    summary = run_sweep(plan, tmp_path)
    assert summary["choice"]["base_lr"] == 0.5
    assert [row["val_accuracy"] for row in summary["grid"] if row["setting"]["base_lr"] == 1e9] == [None]


def test_bench_table_groups_and_figures(tmp_path, saved_backbone, tiny_task) -> None:
    plans = plan_bench([str(tiny_task)], ["linear", "vpt-deep"], TINY, saved_backbone, lrs=[0.5], seeds=1)
    summary = run_bench(plans, tmp_path)
    rows = {row["method"]: row for row in summary["rows"]}
    name = tiny_task.name
    assert set(rows) == {"linear", "vpt-deep"} and rows["linear"]["mean other"] == rows["linear"][name]
    assert rows["vpt-deep"]["trainable %"] > rows["linear"]["trainable %"]
    for file in ("bench.md", "bench.csv", "bench.json", "accuracy.png", "tradeoff.png"):
        assert (tmp_path / file).stat().st_size > 0
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "bench.csv").read_text().splitlines()[0].startswith(f"method,{name},")


def test_bench_table_tool_rebuilds_the_bench_from_its_runs(tmp_path, saved_backbone, tiny_task) -> None:
    """vptune.tools.bench_table writes, from recorded runs alone, the table the bench wrote; a cell may come from
    another folder; a missing run, or one recorded for another spec, is named and nothing trains."""
    plan = {"budget": TINY, "backbone": saved_backbone, "lrs": [0.5, 0.25], "seeds": 1}
    bench, other = tmp_path / "bench", tmp_path / "other"
    run_bench(plan_bench([str(tiny_task)], ["linear", "vpt-deep"], **plan), bench)
    (other / tiny_task.name).mkdir(parents=True)
    (bench / tiny_task.name / "linear").rename(other / tiny_task.name / "linear")
    summary = bench_table_tool.table(
        bench, {"linear": other}, [str(tiny_task)], ["linear", "vpt-deep"], tmp_path / "table", **plan
    )
    assert (tmp_path / "table" / "bench.md").read_text() == (bench / "bench.md").read_text()
    assert [row["method"] for row in summary["rows"]] == ["linear", "vpt-deep"]
    assert (tmp_path / "table" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    detail = (tmp_path / "table" / "detail.md").read_text().splitlines()
    sweep = json.loads((bench / tiny_task.name / "vpt-deep" / "sweep.json").read_text())
    chosen = f"**{sweep['choice']['base_lr']:g}: "
    assert detail[2].startswith(f"| {tiny_task.name} | linear |") and detail[3].startswith(
        f"| {tiny_task.name} | vpt-deep |"
    )
    assert chosen in detail[3] and detail[3].count("**") == 2 and "0.25: " in detail[3] and "0.5: " in detail[3]
    assert f"{100 * sweep['final_train_accuracy'][0]:.1f}" in detail[3].split("|")[4]
    with pytest.raises(bench_table_tool.MissingRun, match="no runs for .* linear"):
        bench_table_tool.table(bench, {}, [str(tiny_task)], ["linear"], tmp_path / "t2", **plan)
    with pytest.raises(bench_table_tool.MissingRun, match="grid-lr0.125"):
        plan = {**plan, "lrs": [0.5, 0.125]}
        bench_table_tool.table(bench, {}, [str(tiny_task)], ["vpt-deep"], tmp_path / "t3", **plan)


def test_bench_groups_follow_vtab() -> None:
    cell = {"trainable_parameters": 10, "backbone_parameters": 1000, "tuned_parameters": 0, "test_std": 0.0}
    tasks = ["eurosat", "cifar10", "dsprites_loc", "coil20_pose"]
    results = {
        (task, "linear"): {**cell, "test_mean": 0.1 * (i + 1), "test_accuracy": [0.1 * i + 0.05, 0.1 * i + 0.15]}
        for i, task in enumerate(tasks)
    }
    row = bench_table(results, tasks, ["linear"])[0]
    assert row["mean sd"] == pytest.approx(statistics.stdev([22.5, 32.5]))  # the seeds' means over tasks
    assert row["mean specialized"] == pytest.approx(10) and row["mean natural"] == pytest.approx(20)
    assert row["mean structured"] == pytest.approx(35) and row["mean"] == pytest.approx(25)
    assert row["total params"] == pytest.approx((1000 + 4 * 10) / 1000) and row["trainable %"] == pytest.approx(1)


@pytest.mark.real
@needs_real("coil20_pose")
def test_bench_smoke_budget_on_the_real_suite(tmp_path, capsys) -> None:
    """The smoke bench on a real task (one: every sweep of it trains the real DINOv2-S on 1000 images)."""
    argv = ["bench", "--budget", "smoke", "--tasks", "coil20_pose", "--methods", "linear,vpt-deep"]
    assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| method | coil20_pose | mean structured | mean |" in out
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["budget"] == "smoke" and len(summary["rows"]) == 2
    sweep = json.loads((tmp_path / "coil20_pose" / "vpt-deep" / "sweep.json").read_text())
    assert len(sweep["grid"]) == 4 and sweep["seeds"] == 1 and 0 <= sweep["test_mean"] <= 1
    assert (tmp_path / "tradeoff.png").is_file()


def test_sweep_command_writes_and_resumes(tmp_path, saved_backbone, tiny_task, capsys) -> None:
    argv = ["sweep", "--data", str(tiny_task), "--method", "linear", "--backbone", saved_backbone, "--budget", "smoke"]
    argv += ["--lr", "0.5,0.1", "--wd", "0", "--seeds", "2", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("# linear on colors") and "Test accuracy over 2 seed(s)" in out
    first = json.loads((tmp_path / "sweep.json").read_text())
    assert [row["setting"]["base_lr"] for row in first["grid"]] == [0.1, 0.5] and first["budget"]["name"] == "smoke"
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    assert main(argv) == 0  # the same command again: every run is found finished
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()} == stamps
    assert json.loads((tmp_path / "sweep.json").read_text())["test_accuracy"] == first["test_accuracy"]
    capsys.readouterr()
    assert main(["sweep", "--data", str(tiny_task), "--method", "linear", "--num-tokens", "5", "--out", "x"]) == 1
    assert "has no prompts" in capsys.readouterr().err


def test_batched_sweep_gives_the_unbatched_grid(tmp_path, saved_backbone, tiny_task) -> None:
    """--batched K: grid settings of one prompt length train together; same scores as one by one (no dropout)."""
    no_dropout = plan_sweep(str(tiny_task), "vpt-shallow", TINY, saved_backbone, lrs=[2.0, 1.0, 0.5], seeds=1)
    assert no_dropout.grid_runs()[0]["run"]["prompt"]["dropout"] == 0.0
    one = run_sweep(no_dropout, tmp_path / "one")
    three = run_sweep(no_dropout, tmp_path / "three", make_executor(batched=3))
    for ours, theirs in zip(three["grid"], one["grid"], strict=True):
        assert ours["setting"] == theirs["setting"] and ours["val_accuracy"] == theirs["val_accuracy"]
    assert three["choice"] == one["choice"] and three["test_accuracy"] == one["test_accuracy"]
    run = json.loads((tmp_path / "three" / "runs" / f"{three['runs'][0]}.json").read_text())
    assert run["metrics"]["batched"] == 3
    assert three["grid_train_accuracy"] == one["grid_train_accuracy"] is not None  # the collapse check runs on it
    with pytest.raises(ValueError, match="local backend"):
        make_executor("ray", batched=2)


def test_a_diverging_setting_of_a_batched_grid_loses_and_the_others_score_as_alone(
    tmp_path, saved_backbone, tiny_task
) -> None:
    """A setting whose lr blows its tensors up stops in the batched pass and is scored as a failure, as one by one;
    the other settings of the same pass score what they score one by one."""
    huge = 3.4e38 * 256 / TINY.batch_size  # the largest lr a float32 holds
    plan = plan_sweep(str(tiny_task), "vpt-shallow", TINY, saved_backbone, lrs=[huge, 1.0, 0.5], seeds=1)
    one = run_sweep(plan, tmp_path / "one")
    three = run_sweep(plan, tmp_path / "three", make_executor(batched=3))
    for ours, theirs in zip(three["grid"], one["grid"], strict=True):
        assert ours["setting"] == theirs["setting"] and ours["val_accuracy"] == theirs["val_accuracy"]
    assert [row["val_accuracy"] for row in three["grid"] if row["setting"]["base_lr"] == huge] == [None]
    runs = {path.name: json.loads(path.read_text()) for path in (tmp_path / "three" / "runs").glob("grid-*.json")}
    diverged = [run for run in runs.values() if run["entry"]["setting"]["base_lr"] == huge]
    assert len(diverged) == 1 and diverged[0]["metrics"]["diverged"].startswith("training diverged at epoch 1")
    assert all(run["metrics"]["batched"] == 3 for run in runs.values() if run not in diverged)
    assert three["choice"] == one["choice"]


def test_a_final_run_far_below_its_grid_run_is_reported_as_a_collapse() -> None:
    plan = plan_sweep("eurosat", "linear", TINY, lrs=[0.5, 0.1], seeds=3)
    setting = plan.settings[0]

    def run(train: float, test: float | None = 0.5) -> dict:
        metrics = {"train_accuracy": train, "val_accuracy": 0.8, "test_accuracy": test}
        return {"entry": {"setting": setting, "id": "x"}, "metrics": metrics, "trainable_parameters": 1,
                "backbone_parameters": 2, "tuned_parameters": 0, "library": "x", "seconds": 1.0}  # fmt: skip

    summary = summarise(plan, [run(0.9)], setting, [run(0.88), run(0.80), run(0.86)])
    assert summary["grid_train_accuracy"] == 0.9 and summary["final_train_accuracy"] == [0.88, 0.80, 0.86]
    assert summary["collapsed_seeds"] == [1]  # 10 points below; seed 2 is 4 points below: within the margin
    assert "Warning: the final run of seed(s) [1]" in summary_markdown(summary)
    assert collapses({("eurosat", "linear"): summary}) == ["eurosat linear seed 1"]


def test_a_second_sweep_into_the_same_folder_is_refused(tmp_path, saved_backbone, tiny_task) -> None:
    plan = plan_sweep(str(tiny_task), "linear", TINY, saved_backbone, lrs=[0.5], seeds=1)
    script = "\n".join(
        [
            "import sys, time",
            "from pathlib import Path",
            "from vptune.sweep.runner import locked",
            "with locked(Path(sys.argv[1])):",
            "    print('held', flush=True)",
            "    time.sleep(60)",
        ]
    )  # another process holding the folder's lock, as a running sweep does
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepLocked, match=re.escape(f"in use by a sweep (pid {holder.pid})")):
            run_sweep(plan, tmp_path)
        assert not (tmp_path / "runs").exists()  # nothing ran
    finally:
        holder.kill()
        holder.wait()
    assert run_sweep(plan, tmp_path)["seeds"] == 1  # the holder gone, its lock went with it
