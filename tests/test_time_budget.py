"""A sweep that keeps to the clock: durations, the plan for datasets of very different sizes, the refusal naming the
smallest budget, the keeper's re-planning on a fake clock, schedules in steps, and whole sweeps under a time budget
(tiny backbone, steps slowed on purpose) that end within it with ``best/`` and the report as always."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time

import pytest
import torch

import vptune.loop
import vptune.runs
import vptune.sweep.timing
from vptune import TrainConfig
from vptune.cli import main
from vptune.methods import get_method
from vptune.sweep.keeper import Timekeeper
from vptune.sweep.plan import Halving
from vptune.sweep.selection import at_edge
from vptune.sweep.timing import (
    LADDER,
    MIN_STEPS,
    SAFETY,
    BudgetTooSmall,
    Schedule,
    Sizes,
    Speed,
    TimePlan,
    centred_lrs,
    parse_duration,
    plan_time,
    price,
    report_seconds,
    run_setup,
    time_plan,
)

# a ViT-S-like speed at 112x112 on a 2-core CPU: 1.45 s per step of 32 (22 images/s), 15 ms per image scored
VIT_112 = Speed(image_size=112, batch_size=32, build=2.0, decode=0.0005, cache=0.0, step=1.45, score=0.015,
                forward=0.015)  # fmt: skip
HEAD_112 = Speed(image_size=112, batch_size=32, build=2.0, decode=0.0005, cache=0.015, step=0.002, score=0.00001,
                 forward=0.015)  # fmt: skip
EUROSAT = Sizes(train=800, val=200, trainval=1000, test=2000)
LARGE = Sizes(train=8000, val=2000, trainval=10000, test=2000)
SMALL = Sizes(train=80, val=20, trainval=100, test=100)


def test_durations() -> None:
    assert [parse_duration(text) for text in ("20m", "1h", "90s", "1h30m", "1.5h", " 2m 30s ")] == [
        1200, 3600, 90, 5400, 5400, 150
    ]  # fmt: skip
    for bad in ("20", "twenty minutes", "20 minutes", "0s", "m", "-5m"):
        with pytest.raises(ValueError, match="time budget"):
            parse_duration(bad)


def test_the_lr_grid_is_centred_on_the_default() -> None:
    assert centred_lrs(0.1, 5) == (0.025, 0.05, 0.1, 0.2, 0.4)
    assert centred_lrs(0.1, 3) == (0.05, 0.1, 0.2) and centred_lrs(0.5, 1) == (0.5,)
    plan = plan_time(1200, EUROSAT, VIT_112.scaled, "vpt-deep")
    assert plan.centre == 0.1 and plan.lrs[len(plan.lrs) // 2] == 0.1
    assert plan_time(1200, EUROSAT, HEAD_112.scaled, "linear").centre == 0.1


@pytest.mark.parametrize("method, speed", [("vpt-deep", VIT_112), ("linear", HEAD_112)])
@pytest.mark.parametrize("sizes", [SMALL, EUROSAT, LARGE], ids=["100 images", "1000 images", "10000 images"])
@pytest.mark.parametrize("seconds", [600, 1200, 3600])
def test_the_plan_fits_the_budget(method: str, speed: Speed, sizes: Sizes, seconds: float) -> None:
    plan = plan_time(seconds, sizes, speed.scaled, method, spent=10.0)
    assert plan.estimate <= SAFETY * seconds  # measuring included
    assert plan.budget.image_size in LADDER and plan.budget.seeds == 1
    if len(plan.lrs) > 1:
        assert plan.schedule.steps(False) >= MIN_STEPS and plan.budget.halving is not None
    passes = plan.schedule.passes[0]
    assert plan.schedule.per_epoch(False) <= passes  # an epoch is at most a pass
    epoch = plan.schedule.per_epoch(False) * plan.speed.step
    assert epoch <= 0.025 * seconds or plan.schedule.per_epoch(False) == 1  # the keeper can act often enough


def test_a_schedule_in_steps_gives_a_large_dataset_fewer_epochs() -> None:
    small, large = (plan_time(1200, sizes, VIT_112.scaled, "vpt-deep") for sizes in (EUROSAT, LARGE))
    assert small.budget.image_size >= large.budget.image_size
    passes = [p.schedule.steps(False) / p.schedule.passes[0] for p in (small, large)]
    assert passes[0] > 3 * passes[1]  # the small dataset sees its images many more times
    assert large.schedule.epoch_steps is not None and large.schedule.epoch_steps < large.schedule.passes[0]


def test_more_time_buys_pixels_first() -> None:
    """The rule: the largest input at which five settings get MIN_STEPS steps; more time, larger (or equal) input."""
    sizes = [plan_time(seconds, EUROSAT, VIT_112.scaled, "vpt-deep").budget.image_size for seconds in (600, 1200, 7200)]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    head = [plan_time(seconds, EUROSAT, HEAD_112.scaled, "linear") for seconds in (600, 1200)]
    deep = [plan_time(seconds, EUROSAT, VIT_112.scaled, "vpt-deep") for seconds in (600, 1200)]
    for h, d in zip(head, deep, strict=True):  # the cached trunk: many more epochs, a larger input, in the same time
        assert h.schedule.epochs > 3 * d.schedule.epochs and h.budget.image_size >= d.budget.image_size


def test_a_budget_too_small_is_refused_with_the_smallest_that_works() -> None:
    with pytest.raises(BudgetTooSmall, match=r"give at least --time-budget (\w+)") as refusal:
        plan_time(20, EUROSAT, VIT_112.scaled, "vpt-deep")
    smallest = parse_duration(str(refusal.value).rsplit(" ", 1)[-1])
    plan = plan_time(smallest, EUROSAT, VIT_112.scaled, "vpt-deep")
    assert plan.lrs == (0.1,) and plan.budget.image_size == LADDER[-1] and plan.estimate <= SAFETY * smallest
    with pytest.raises(BudgetTooSmall):
        plan_time(smallest - 30, EUROSAT, VIT_112.scaled, "vpt-deep")


def test_the_estimate_prices_halving() -> None:
    schedule = Schedule(9, None, (25, 32))
    full = price(VIT_112, EUROSAT, schedule, 5, None)
    halved = price(VIT_112, EUROSAT, schedule, 5, Halving(3, 3))
    assert halved.grid < 0.65 * full.grid and halved.final == full.final  # 5 x 3 + 2 x 6 epochs of 5 x 9
    assert price(VIT_112, EUROSAT, schedule, 1, None).grid == 0  # one setting: no grid
    assert math.isclose(price(VIT_112, EUROSAT, schedule, 5, None, seeds=3).final, 3 * full.final)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(
    plan: TimePlan, sizes: Sizes, slow_after: float, factor: float, overhead: float = 0.0, trunk: float = 1.0
) -> tuple[float, Timekeeper]:
    """Drive a keeper through a sweep on a fake clock: every piece takes its planned time, times ``factor`` once
    ``slow_after`` seconds have passed, each run ``overhead`` seconds more to set up than planned, and the cached
    trunk ``trunk`` times its planned time; return the end (the report included) and the keeper."""
    clock = FakeClock()
    keeper = Timekeeper(plan, sizes, plan.costs, clock.now, clock=clock, progress=False)
    start = clock.now

    def spend(seconds: float) -> None:
        clock.now += seconds * (factor if clock.now - start > slow_after else 1.0)

    epochs = plan.schedule.epochs
    rung = plan.budget.halving.min_epochs if plan.budget.halving else epochs
    for index in range(len(plan.lrs)):
        entry = {"setting": {"base_lr": plan.lrs[index]}}
        if not keeper.grid_may_start(entry):
            continue
        spend(set_up(keeper.planned, overhead, trunk))
        for epoch in range(1, epochs + 1):
            spend(keeper._epoch(False))
            if keeper.grid_epoch(entry, {"epoch": epoch}, epochs) or (index % 3 and epoch == rung):
                break  # stopped by the keeper, or (two in three) by halving at the rung
    final = {"run": {"train": {"epochs": epochs}}}
    planned = keeper.final_epochs(final)
    spend(set_up(keeper.planned, overhead, trunk))
    epoch = 0
    while epoch < planned:
        epoch += 1
        spend(keeper._epoch(True))
        shorter = keeper.final_epoch({"epoch": epoch}, planned)
        planned = shorter if shorter is not None else planned
    spend(sizes.test * plan.speed.score + set_up(report_seconds(plan.speed, sizes), 0.0, trunk))
    return clock.now - start, keeper


def set_up(planned: tuple[float, float], overhead: float, trunk: float) -> float:
    fixed, cached = planned
    return fixed + overhead + trunk * cached


@pytest.mark.parametrize("sizes", [EUROSAT, LARGE], ids=["1000 images", "10000 images"])
def test_a_sweep_that_becomes_slower_replans_and_ends_within_the_budget(sizes: Sizes) -> None:
    plan = plan_time(1200, sizes, VIT_112.scaled, "vpt-deep", spent=10)
    on_time, keeper = simulate(plan, sizes, slow_after=1e9, factor=1.0)
    assert on_time <= 1200 and not [e for e in keeper.events if "shortened" in e or "stopped" in e]
    for slow_after in (0, 300, 900):
        end, keeper = simulate(plan, sizes, slow_after=slow_after, factor=2.0)
        assert end <= 1.05 * 1200, (slow_after, end, keeper.events)
        assert keeper.events  # it re-planned
        cuts = [tuple(map(int, re.search(r"(\d+) epochs instead of (\d+)", e).groups())) for e in keeper.events
                if "shortened" in e]  # fmt: skip
        assert all(new < old for new, old in cuts)  # each cut shortens the run
        assert all(cuts[i][1] == cuts[i - 1][0] for i in range(1, len(cuts)))  # from the length the last cut left
    faster, keeper = simulate(plan, sizes, slow_after=0, factor=0.6)
    assert faster <= 1200 and any("final run" in e for e in keeper.events)  # the time saved goes to the final run


def test_set_up_beyond_the_plan_is_learnt_from_the_first_runs() -> None:
    """Each run takes 20 s more to set up than planned (a short epoch's first steps, the data stacked ...): the
    keeper measures it on the first run, expects it of the others, and still ends within the budget, not far before."""
    plan = plan_time(600, EUROSAT, VIT_112.scaled, "vpt-deep", spent=10)
    end, keeper = simulate(plan, EUROSAT, slow_after=1e9, factor=1.0, overhead=20.0)
    assert 0.8 * 600 <= end <= 1.05 * 600, (end, keeper.events)
    assert keeper.overhead == pytest.approx(20.0) and keeper.slow == pytest.approx(1.0)


# a head-only method at 224x224 (eurosat linear on the 2-core CPU: 0.1 s per image through the trunk), its outputs
# small enough to keep, or not
HEAD_224 = Speed(image_size=224, batch_size=32, build=0.02, decode=0.001, cache=0.1, step=0.002, score=0.0001,
                 forward=0.1001, kept_bytes=1536)  # fmt: skip
HEAD_224_UNKEPT = dataclasses.replace(HEAD_224, kept_bytes=1e9)


def test_kept_trunk_outputs_are_priced_once() -> None:
    """Five grid settings: train + val go through the trunk once, not five times; the final run adds test only, and
    the report reads it back. Outputs too large to keep: every run and the report pay for their images."""
    schedule = Schedule(10, None, (25, 32))
    kept, unkept = (price(speed, EUROSAT, schedule, 5, Halving(3, 3)) for speed in (HEAD_224, HEAD_224_UNKEPT))
    trunk = HEAD_224.cache
    assert unkept.grid - kept.grid == pytest.approx(4 * 1000 * trunk)
    assert unkept.final - kept.final == pytest.approx(1000 * trunk)
    assert unkept.report - kept.report == pytest.approx(2000 * trunk)
    assert run_setup(HEAD_224, EUROSAT, False, "none")[1] == pytest.approx(1000 * trunk)
    assert run_setup(HEAD_224, EUROSAT, False, "grid")[1] == 0 and run_setup(HEAD_224, EUROSAT, True, "final")[1] == 0
    assert run_setup(VIT_112, EUROSAT, True, "grid")[1] == 0  # no cache: nothing through a trunk


@pytest.mark.parametrize("speed", [HEAD_224, HEAD_224_UNKEPT], ids=["kept", "not kept"])
@pytest.mark.parametrize("trunk", [0.7, 1.3, 1.6])
def test_a_trunk_slower_than_measured_is_learnt_from_the_first_set_up(speed: Speed, trunk: float) -> None:
    """A head-only sweep's time is its images through the trunk (set-ups, the report): when the trunk runs 1.3x as
    long as measured, the keeper learns it from the first set-up that cached images and holds the final run and
    the report to it (eurosat linear 20m at 7ddf20a passed its budget by 23 s when it did not)."""
    plan = plan_time(1200, EUROSAT, lambda size: speed.scaled(size), "linear", image_size=224, spent=20)
    end, keeper = simulate(plan, EUROSAT, slow_after=1e9, factor=1.0, trunk=trunk)
    assert end <= 1200, (end, keeper.events)
    assert keeper.trunk == pytest.approx(trunk, rel=0.05)


def test_epoch_steps_and_a_shortened_run(tiny_model_and_data) -> None:
    model, data = tiny_model_and_data
    calls: list[int] = []
    real = vptune.loop.train_step

    def counted(trainee, inputs, labels, lrs, epoch, step):
        calls.append(step)
        return real(trainee, inputs, labels, lrs, epoch, step)

    lrs: list[float] = []
    config = TrainConfig(epochs=6, batch_size=4, epoch_steps=2, base_lr=0.1, val_split=None, test_split=None,
                         progress=False)  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vptune.loop, "train_step", counted)
        metrics = vptune.fit(
            model, data, config, on_epoch_end=lambda m: lrs.append(m["lr"]) or (3 if m["epoch"] == 1 else None)
        )  # noqa: E501
    assert calls == list(range(6))  # 3 epochs of 2 steps (of the split's 4), the run cut from 6 epochs to 3
    assert metrics["epoch"] == 3 and metrics["shortened_to"] == 3
    assert lrs[-1] < 0.2 * lrs[0]  # the cosine decayed over the new length
    with pytest.raises(ValueError, match="epoch_steps must be >= 1"):
        TrainConfig(epoch_steps=0)


@pytest.fixture
def tiny_model_and_data(saved_backbone, tiny_task):
    task = vptune.open_task(str(tiny_task))
    backbone = vptune.load_backbone(saved_backbone)
    model = vptune.build("vpt-shallow", backbone, task.num_classes, image_size=16)
    config = TrainConfig(batch_size=4)
    return model, vptune.engine.load_splits(task, config, model.preprocessing)


def test_the_chosen_lr_at_the_grid_edge_is_said() -> None:
    def run(lr: float) -> dict:
        return {"entry": {"setting": {"base_lr": lr, "weight_decay": 0.0, "num_tokens": None}}}

    grid = [run(0.05), run(0.1), run(0.2)]
    assert "highest" in at_edge(grid, {"base_lr": 0.2}) and "lowest" in at_edge(grid, {"base_lr": 0.05})
    assert at_edge(grid, {"base_lr": 0.1}) is None and at_edge(grid[:1], {"base_lr": 0.05}) is None


@pytest.fixture
def slowed(monkeypatch):
    """Training steps made slow (real time): ``slowed["seconds"]`` per step, changeable as the sweep runs."""
    state = {"seconds": 0.03, "steps": 0, "after": None, "then": None}
    real = vptune.loop.train_step

    def slow_step(*args, **kwargs):
        state["steps"] += 1
        if state["after"] is not None and state["steps"] > state["after"]:
            state["seconds"] = state["then"]
        time.sleep(state["seconds"])
        return real(*args, **kwargs)

    monkeypatch.setattr(vptune.loop, "train_step", slow_step)
    torch.set_num_threads(1)
    return state


def sweep_argv(tiny_task, saved_backbone, out, budget: str, method: str = "vpt-shallow") -> list[str]:
    return ["sweep", "--data", str(tiny_task), "--method", method, "--backbone", saved_backbone,
            "--time-budget", budget, "--out", str(out), "--no-progress"]  # fmt: skip


def test_a_time_budget_sweep_ends_within_it(tmp_path, saved_backbone, tiny_task, slowed, capsys, monkeypatch):
    printed_before_training: list[bool] = []
    real_fit = vptune.runs.fit

    def fit(*args, **kwargs):
        printed_before_training.append("estimate:" in capsys.readouterr().err)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(vptune.runs, "fit", fit)
    start = time.perf_counter()
    assert main(sweep_argv(tiny_task, saved_backbone, tmp_path, "15s")) == 0
    wall = time.perf_counter() - start
    assert wall <= 1.1 * 15 and printed_before_training[0]
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    timing = sweep["timing"]
    assert timing["budget_seconds"] == 15 and timing["plan"]["image_size"] in LADDER
    assert sweep["budget"]["name"] == "time-15s" and "planned to fit 15 s" in sweep["budget"]["note"]
    assert (tmp_path / "best" / "weights.safetensors").is_file()
    report = (tmp_path / "report.md").read_text()
    for section in ("## Grid", "## Choice and test accuracy", "## The tuned model: `best/`", "## Per-class"):
        assert section in report  # the report as always
    assert "## Time" in report and "The plan, as printed before training" in report and "of the 15 s budget" in report
    assert "wall time:" in capsys.readouterr().out


def test_a_sweep_that_slows_down_keeps_to_its_budget(tmp_path, saved_backbone, tiny_task, slowed):
    slowed.update(after=40, then=0.09)  # three times slower once the grid has begun
    start = time.perf_counter()
    assert main(sweep_argv(tiny_task, saved_backbone, tmp_path, "20s")) == 0
    assert time.perf_counter() - start <= 1.1 * 20
    timing = json.loads((tmp_path / "sweep.json").read_text())["timing"]
    cut = ("shortened", "stopped", "not run")
    assert any(word in event for event in timing["replans"] for word in cut), timing  # it saw the change
    assert (tmp_path / "best" / "vptune.json").is_file()


def test_time_budget_refusals(tmp_path, saved_backbone, tiny_task, capsys) -> None:
    assert main(sweep_argv(tiny_task, saved_backbone, tmp_path / "a", "1s")) == 1
    assert "give at least --time-budget" in capsys.readouterr().err
    assert not (tmp_path / "a" / "runs").exists()  # refused before training
    argv = sweep_argv(tiny_task, saved_backbone, tmp_path / "b", "1m")
    assert main([*argv, "--budget", "cpu-tune"]) == 1
    assert "drop --budget" in capsys.readouterr().err
    assert main([*argv, "--batched", "2"]) == 1
    assert "drop --backend ray and --batched" in capsys.readouterr().err
    assert main(["sweep", "--data", str(tiny_task), "--method", "linear", "--time-budget", "20 min", "--out", "x"]) == 1
    assert "write it as e.g. 20m" in capsys.readouterr().err


def test_every_sweep_prints_its_estimate(tmp_path, saved_backbone, tiny_task, capsys) -> None:
    argv = ["sweep", "--data", str(tiny_task), "--method", "linear", "--backbone", saved_backbone, "--budget", "smoke"]
    assert main([*argv, "--lr", "0.5", "--out", str(tmp_path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "estimate on this machine" in err and "in all" in err
    assert "estimate on this machine" in json.loads((tmp_path / "sweep.json").read_text())["timing"]["text"]


def test_a_dry_run_prints_the_plan_and_trains_nothing(tmp_path, saved_backbone, tiny_task, capsys) -> None:
    assert main([*sweep_argv(tiny_task, saved_backbone, tmp_path / "out", "5m"), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "time budget 5 min 0 s" in err and "grid: 5 settings" in err and "estimate:" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method",
    ["linear", "mlp-2", "vpt-shallow", "vpt-deep", "vpt-deep+bias", "bias", "partial-1", "full", "adapter", "lora",
     "sidetune"],
)  # fmt: skip
def test_every_method_gets_a_plan(method: str, saved_backbone, tiny_task) -> None:
    torch.set_num_threads(1)
    sweep, plan = time_plan(str(tiny_task), method, saved_backbone, 600)
    assert plan.estimate <= SAFETY * 600 and plan.centre == get_method(method)[0].base_lr
    assert [s["base_lr"] for s in sweep.settings] == sorted(plan.lrs) and sweep.seeds == 1
    entry = (sweep.grid_runs() or sweep.final_runs(sweep.settings[0]))[0]
    assert entry["run"]["image_size"] == plan.budget.image_size
    assert entry["run"]["train"]["epochs"] == plan.schedule.epochs
    if get_method(method)[0].head_only:  # the cached trunk: steps cost next to nothing
        assert plan.speed.cache > 0 and plan.speed.step < plan.speed.cache * plan.speed.batch_size


def test_a_recorded_plan_is_planned_again_without_measuring(saved_backbone, tiny_task, monkeypatch) -> None:
    torch.set_num_threads(1)
    sweep, plan = time_plan(str(tiny_task), "vpt-deep", saved_backbone, 300)
    assert plan.measured and plan.speed in plan.measured

    def no_measuring(*args, **kwargs):
        raise AssertionError("a replayed plan measures nothing")

    monkeypatch.setattr(vptune.sweep.timing, "measure", no_measuring)
    record = json.loads(json.dumps(plan.record()))  # as written to time-plan.json and read back
    again_sweep, again = time_plan(str(tiny_task), "vpt-deep", saved_backbone, 300, replay=record)
    assert (again.budget, again.lrs, again.schedule, again.costs) == (plan.budget, plan.lrs, plan.schedule, plan.costs)
    assert again_sweep.grid_runs() == sweep.grid_runs()


def test_an_interrupted_time_budget_sweep_resumes_its_plan(tmp_path, saved_backbone, tiny_task, capsys, monkeypatch):
    """Run again with the same command after an interruption (here: a grid run's and the final run's results lost),
    the sweep plans from the recorded measurements, keeps the runs written and trains only what is missing."""
    torch.set_num_threads(1)
    monkeypatch.setattr(vptune.sweep.timing, "MIN_STEPS", 4)  # a grid of five settings within 10 s
    monkeypatch.setattr(Timekeeper, "grid_may_start", lambda self, entry: self._begin(False) or True)
    monkeypatch.setattr(Timekeeper, "grid_epoch", lambda *args: False)  # the grid as planned: no setting skipped
    argv = sweep_argv(tiny_task, saved_backbone, tmp_path, "10s")
    assert main(argv) == 0
    runs = sorted((tmp_path / "runs").glob("*.json"))
    grid = [path for path in runs if json.loads(path.read_text())["entry"]["stage"] == "grid"]
    final = [path for path in runs if json.loads(path.read_text())["entry"]["stage"] == "final"]
    assert len(final) == 1 and len(grid) > 1
    trained: list[float] = []
    real = vptune.runs.fit

    def counted(model, data, config, *args, **kwargs):
        trained.append(config.base_lr)
        return real(model, data, config, *args, **kwargs)

    monkeypatch.setattr(vptune.runs, "fit", counted)
    capsys.readouterr()
    assert main(argv) == 0  # nothing lost: nothing trained again, whatever length the final run was given
    assert trained == [] and "resuming the plan" in capsys.readouterr().err
    lost_grid = json.loads(grid[0].read_text())["entry"]
    for path in (grid[0], final[0]):
        path.unlink()
    shutil.rmtree(tmp_path / "tasks")
    assert main(argv) == 0
    assert len(trained) == 2 and trained[0] == lost_grid["run"]["train"]["base_lr"]
    assert (tmp_path / "best" / "weights.safetensors").is_file()
    capsys.readouterr()
    assert main(sweep_argv(tiny_task, saved_backbone, tmp_path, "12s")) == 0  # another budget: measured, planned anew
    assert "resuming the plan" not in capsys.readouterr().err
