"""A sweep that keeps to the clock (``vptune sweep --time-budget 20m``), and the estimate every sweep prints.

Three parts:

- :func:`measure`: this machine's speed for one method, backbone and input size, from a few training steps on a few
  of the task's images (:class:`Speed`: seconds per step, per image decoded, cached, scored).
- :func:`plan_time`: the plan that fits a budget (:class:`TimePlan`): the input size, the lr grid (centred on the
  method's default), a grid run's length in steps, where successive halving stops settings, the final run; the rule
  (docs/benchmarks.md has the measurements behind it): the largest input of :data:`LADDER` at which five settings
  each get at least :data:`MIN_STEPS` steps, else the smallest input with fewer settings; a schedule in steps, so
  that a large dataset gets fewer epochs and a small one more; an epoch at most :data:`GRAIN` of the budget.
- :class:`Timekeeper`: holds a running sweep to its plan, re-planning from the measured speed: a grid setting
  stops (or does not start) when the final run's time would be eaten, the final run's length is set from the time
  left when it starts and shortened if it falls behind; it also shows the progress bar with the time left.

:func:`estimate` prices any plan (a preset budget's too) with the same cost model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..data import ImageDataset, open_task, read_split
from ..engine import Splits, cache_point
from ..files import write_json
from ..loop import fit
from ..methods import get_method
from ..runs import RunSpec, build_run
from ..trunk_memory import MAX_BYTES as MAX_KEPT_BYTES
from ..trunk_memory import keep_trunk_outputs
from .plan import Budget, Halving, SweepPlan, plan_sweep

LADDER = (224, 168, 112, 84, 56)  # input sizes a time budget chooses from (multiples of 14 and 16's 112, 224)
MIN_STEPS = 200  # a grid run's steps at least, for five settings at an input size (see docs/benchmarks.md)
MAX_EPOCHS = 100  # the paper's schedule: no run is planned longer
SETTINGS = (5, 3, 1)  # lr grid sizes tried in turn: the default x 2^k, k centred on 0
REDUCTION = 3  # successive halving's reduction factor
GRAIN = 0.025  # an epoch takes at most this share of the budget (where the keeper can act)
SAFETY = 0.95  # the plan fills this share of the budget; the rest absorbs what estimates miss
BATCH = 32
WEIGHT_DECAY = 1e-4
PROBE_STEPS = 3
TIME_PLAN_FILE = "time-plan.json"
REPORT_SECONDS = 3.0  # the report's figures and files, beyond scoring best/ on test


def parse_duration(text: str) -> float:
    """``"20m"``, ``"1h"``, ``"90s"``, ``"1h30m"``, ``"1.5h"`` in seconds."""
    cleaned = text.strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", cleaned)
    if not parts or "".join(number + unit for number, unit in parts) != cleaned:
        raise ValueError(f"time budget {text!r}: write it as e.g. 20m, 1h, 90s or 1h30m")
    seconds = sum(float(number) * {"h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts)
    if seconds <= 0:
        raise ValueError(f"time budget {text!r} must be more than 0")
    return seconds


def duration(seconds: float) -> str:
    """``1234`` as ``"20 min 34 s"``."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


@dataclass(frozen=True)
class Speed:
    """What a run costs on this machine for one method, backbone and input size, in seconds: a model built, an
    image decoded, an image through the cached trunk (0 without a cache), a training step of ``batch_size`` images,
    an image scored through the training stage, an image scored through the whole model (the report); and the bytes
    of one image's kept trunk output (0 without a cache)."""

    image_size: int
    batch_size: int
    build: float
    decode: float
    cache: float
    step: float
    score: float
    forward: float
    kept_bytes: float = 0.0

    def scaled(self, image_size: int) -> Speed:
        """An estimate at another input size: costs that grow with the image's pixels scaled by their ratio."""
        ratio = (image_size / self.image_size) ** 2
        return dataclasses.replace(
            self, image_size=image_size, cache=self.cache * ratio, step=self.step * ratio,
            score=self.score * ratio if not self.cache else self.score, forward=self.forward * ratio,
            kept_bytes=self.kept_bytes * ratio,  # a token grid grows with the pixels (pooled features do not)
        )  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    """A task's split sizes in images."""

    train: int
    val: int
    trainval: int
    test: int

    @classmethod
    def of(cls, data: str) -> Sizes:
        task = open_task(data)
        return cls(*(len(read_split(task, split)) for split in ("train", "val", "trainval", "test")))

    @property
    def beyond(self) -> int:
        """Images of the train + val split that neither train nor val holds (0 where it is their union)."""
        return max(0, self.trainval - self.train - self.val)


def measure(spec: RunSpec, steps: int = PROBE_STEPS, clock: Callable[[], float] = time.perf_counter) -> Speed:
    """Time ``spec``'s model on a few of its task's images: built, decoded, cached, ``steps`` training steps, one
    batch scored; nothing is written."""
    start = clock()
    task, model, _ = build_run(spec)
    built = clock()
    config = dataclasses.replace(
        spec.train.for_method(model.method), epochs=1, warmup_epochs=0, epoch_steps=steps, progress=False,
        val_split="val", test_split=None,
    )  # fmt: skip
    batch = config.batch_size
    train_items = read_split(task, config.train_split)[: steps * batch]
    val_items = read_split(task, "val")[:batch]
    train = ImageDataset(train_items, model.preprocessing)
    val = ImageDataset(val_items, model.preprocessing)
    decoded = clock()
    cached = bool(cache_point(model, train, config))
    with keep_trunk_outputs() as memory:
        metrics = fit(model, Splits(train, val), config)
    done = clock()
    step = metrics["seconds"] / min(steps, math.ceil(len(train) / batch))
    score = metrics["val_seconds"] / max(1, len(val))
    cache = max(0.0, done - decoded - metrics["seconds"] - metrics["val_seconds"]) / (len(train) + len(val))
    return Speed(
        image_size=model.image_size, batch_size=batch, build=built - start,
        decode=(decoded - built) / max(1, len(train) + len(val)), cache=cache if cached else 0.0, step=step,
        score=score, forward=cache + score if cached else score, kept_bytes=memory.bytes_per_output,
    )  # fmt: skip


@dataclass(frozen=True)
class Schedule:
    """One run's length: ``epochs`` of ``epoch_steps`` steps (``epoch_steps`` none: a whole pass)."""

    epochs: int
    epoch_steps: int | None
    passes: tuple[int, int]  # steps of one pass over train and over train + val

    def steps(self, final: bool) -> int:
        return self.epochs * self.per_epoch(final)

    def per_epoch(self, final: bool) -> int:
        whole = self.passes[1 if final else 0]
        return min(whole, self.epoch_steps) if self.epoch_steps else whole


@dataclass(frozen=True)
class Costs:
    """The seconds of each part of a sweep, priced by :func:`price`."""

    grid: float
    final: float
    report: float

    @property
    def total(self) -> float:
        return self.grid + self.final + self.report


def price(
    speed: Speed, sizes: Sizes, schedule: Schedule, settings: int, halving: Halving | None, seeds: int = 1
) -> Costs:
    """What a sweep of ``settings`` grid settings (none scored when 1) and ``seeds`` final runs should take: a
    setting that successive halving stops trains to its first rung, and one in ``REDUCTION`` goes on (the first
    always). Where the runs keep the trunk's outputs (:func:`kept`), only the first run to see an image caches it."""
    grid, before = 0.0, "none"
    if settings > 1:
        epoch = epoch_seconds(speed, schedule.per_epoch(False), sizes.val)
        rung = halving.min_epochs if halving else schedule.epochs
        going_on = 1 + round((settings - 1) / REDUCTION) if halving else settings
        setups = sum(sum(run_setup(speed, sizes, False, "grid" if k else "none")) for k in range(settings))
        grid = setups + settings * rung * epoch + going_on * (schedule.epochs - rung) * epoch
        before = "grid"
    final = sum(
        final_seconds(speed, sizes, schedule.steps(True), before if seed == 0 else "final") for seed in range(seeds)
    )
    return Costs(grid, final, sum(report_seconds(speed, sizes)))


def estimate(plan: SweepPlan, speed: Speed, sizes: Sizes) -> Costs:
    """What a planned sweep (a preset budget's) should take at ``speed``."""
    budget = plan.budget
    passes = (math.ceil(sizes.train / budget.batch_size), math.ceil(sizes.trainval / budget.batch_size))
    schedule = Schedule(budget.epochs, budget.epoch_steps, passes)
    return price(speed, sizes, schedule, len(plan.grid_runs()) or 1, budget.halving, plan.seeds)


def kept(speed: Speed, sizes: Sizes) -> bool:
    """Whether the sweep's runs read back each other's trunk outputs (:mod:`vptune.trunk_memory`): a cached trunk
    whose outputs for every split fit the memory."""
    images = sizes.train + sizes.val + sizes.beyond + sizes.test
    return speed.cache > 0 and images * speed.kept_bytes <= MAX_KEPT_BYTES


def run_setup(speed: Speed, sizes: Sizes, final: bool, before: str) -> tuple[float, float]:
    """A run's seconds before its first step, in two parts: the model built and its images decoded, and its images
    through the cached trunk (0 without a cache). ``before``: the runs set up earlier in the sweep (``"none"``,
    ``"grid"``: a grid run, ``"final"``: a final run), whose trunk outputs this run reads back where they are kept."""
    images = sizes.trainval + sizes.test if final else sizes.train + sizes.val
    cached = images
    if kept(speed, sizes):
        new = {"none": images, "grid": sizes.beyond + sizes.test if final else 0, "final": 0}
        cached = new[before]
    return speed.build + images * speed.decode, cached * speed.cache


def epoch_seconds(speed: Speed, steps: int, scored: int) -> float:
    return steps * speed.step + scored * speed.score


def final_seconds(speed: Speed, sizes: Sizes, steps: int, before: str) -> float:
    """The final run: set up on train + val and test, ``steps`` steps, test scored once."""
    return sum(run_setup(speed, sizes, True, before)) + steps * speed.step + sizes.test * speed.score


def report_seconds(speed: Speed, sizes: Sizes) -> tuple[float, float]:
    """The report: ``best/`` loaded and scored on test through the whole model (reading back the final run's trunk
    outputs where they are kept), the figures; in two parts as :func:`run_setup`'s."""
    fixed = speed.build + sizes.test * (speed.decode + speed.forward - speed.cache) + REPORT_SECONDS
    return fixed, 0.0 if kept(speed, sizes) else sizes.test * speed.cache


@dataclass(frozen=True)
class TimePlan:
    """A plan that fits a time budget: the sweep's :class:`Budget` and grid, the schedule, the estimate."""

    seconds: float
    budget: Budget
    lrs: tuple[float, ...]
    schedule: Schedule
    costs: Costs
    speed: Speed
    centre: float
    probe_seconds: float = 0.0
    notes: tuple[str, ...] = ()
    measured: tuple[Speed, ...] = ()  # every speed measured while planning (a resumed sweep plans from them again)

    @property
    def estimate(self) -> float:
        return self.probe_seconds + self.costs.total

    def record(self) -> dict:
        """As JSON (``sweep.json``'s ``timing.plan``)."""
        return {
            "budget_seconds": self.seconds, "image_size": self.budget.image_size, "lrs": list(self.lrs),
            "centre": self.centre, "epochs": self.schedule.epochs, "epoch_steps": self.schedule.epoch_steps,
            "grid_steps": self.schedule.steps(False) if len(self.lrs) > 1 else 0,
            "final_steps": self.schedule.steps(True),
            "halving": dataclasses.asdict(self.budget.halving) if self.budget.halving else None,
            "estimate": {"probe": self.probe_seconds, **dataclasses.asdict(self.costs), "total": self.estimate},
            "speed": dataclasses.asdict(self.speed), "notes": list(self.notes),
            "measured": [dataclasses.asdict(speed) for speed in self.measured],
        }  # fmt: skip


class BudgetTooSmall(ValueError):
    """No plan fits the time budget; the message names the smallest one that does."""


def centred_lrs(centre: float, count: int) -> tuple[float, ...]:
    """``count`` base lrs a factor of 2 apart, centred on ``centre`` (the method's default)."""
    half = count // 2
    return tuple(centre * 2.0**k for k in range(-half, count - half))


def plan_time(
    seconds: float,
    sizes: Sizes,
    speed_at: Callable[[int], Speed],
    method: str,
    image_size: int | None = None,
    lrs: tuple[float, ...] | None = None,
    spent: float = 0.0,
) -> TimePlan:
    """The plan that fits ``seconds`` (``spent`` of them gone already, e.g. measuring).

    Args:
        seconds: the time budget.
        sizes: the task's split sizes.
        speed_at: this machine's speed at an input size (measured, or scaled from a measurement).
        method: the tuning method (its default base lr is the grid's centre).
        image_size: a fixed input size instead of the ladder's choice.
        lrs: a fixed lr grid instead of the centred one.

    Raises:
        BudgetTooSmall: not even one setting trained for one epoch at the smallest input fits; the message names
            the smallest budget that does.
    """
    registered = get_method(method)[0]
    sizes_to_try = (image_size,) if image_size else LADDER
    counts = (len(lrs),) if lrs else SETTINGS
    room = SAFETY * seconds - spent
    for count in counts:
        floor = MIN_STEPS if count > 1 else 1
        for size in sizes_to_try if count == counts[0] else sizes_to_try[-1:]:
            plan = _fit(room, sizes, speed_at(size), lrs or centred_lrs(registered.base_lr, count), floor, seconds)
            if plan is not None:
                return _noted(dataclasses.replace(plan, centre=registered.base_lr, probe_seconds=spent))
    smallest = _smallest(sizes, speed_at(sizes_to_try[-1]), spent)
    raise BudgetTooSmall(
        f"a time budget of {duration(seconds)} does not fit one setting trained for one epoch at "
        f"{sizes_to_try[-1]}x{sizes_to_try[-1]} on this machine (after {spent:.0f} s measuring its speed): "
        f"give at least --time-budget {_written(smallest)}"
    )


def _fit(room: float, sizes: Sizes, speed: Speed, lrs: tuple, floor: int, seconds: float) -> TimePlan | None:
    """The longest schedule at ``speed`` whose sweep fits ``room`` seconds, if it has at least ``floor`` steps."""
    passes = (math.ceil(sizes.train / speed.batch_size), math.ceil(sizes.trainval / speed.batch_size))
    grain = max(1, math.floor(GRAIN * seconds / max(speed.step, 1e-9)))
    epoch_steps = grain if grain < passes[0] else None
    best = None
    for epochs in range(1, MAX_EPOCHS * passes[0] // (epoch_steps or passes[0]) + 1):
        schedule = Schedule(epochs, epoch_steps, passes)
        halving = Halving(max(1, epochs // REDUCTION), REDUCTION) if len(lrs) > 1 and epochs >= 2 else None
        costs = price(speed, sizes, schedule, len(lrs), halving)
        if costs.total > room:
            break
        best = (schedule, halving, costs)
    floor = min(floor, MAX_EPOCHS * passes[0])  # a small dataset: the paper's 100 epochs are enough
    if best is None or (len(lrs) > 1 and (best[0].steps(False) < floor or best[0].epochs < REDUCTION)):
        return None
    schedule, halving, costs = best
    budget = Budget(
        f"time-{_written(seconds)}", image_size=speed.image_size, epochs=schedule.epochs, warmup_epochs=None,
        batch_size=speed.batch_size, seeds=1, sgd_lrs=lrs, adamw_lrs=lrs, head_only_lrs=lrs, wds=(WEIGHT_DECAY,),
        halving=halving, epoch_steps=epoch_steps,
    )  # fmt: skip
    return TimePlan(seconds, budget, lrs, schedule, costs, speed, centre=0.0)


def _noted(plan: TimePlan) -> TimePlan:
    """The plan with its budget's note saying what it is (the summary and report show it)."""
    s, schedule = plan.budget, plan.schedule
    grid = ", ".join(f"{lr:g}" for lr in plan.lrs)
    rung = f", successive halving at epoch {s.halving.min_epochs} (reduction {REDUCTION})" if s.halving else ""
    note = (
        f"planned to fit {duration(plan.seconds)} on this machine: {s.image_size}x{s.image_size} input, base lr "
        f"{grid} (centred on the method's default {plan.centre:g}) x weight decay {WEIGHT_DECAY:g}, {schedule.epochs} "
        f"epochs of at most {schedule.per_epoch(True)} steps of {s.batch_size}{rung}, 1 seed"
    )
    return dataclasses.replace(plan, budget=dataclasses.replace(s, note=note))


def _smallest(sizes: Sizes, speed: Speed, spent: float) -> float:
    """The smallest budget with one setting trained for one epoch (the measuring included)."""
    passes = (math.ceil(sizes.train / speed.batch_size), math.ceil(sizes.trainval / speed.batch_size))
    costs = price(speed, sizes, Schedule(1, None, passes), 1, None)
    return math.ceil((costs.total + spent) / SAFETY / 10) * 10


def _written(seconds: float) -> str:
    """Seconds as a ``--time-budget`` value: ``20m``, ``90s``, ``1h``."""
    seconds = round(seconds)
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def describe(plan: TimePlan, sizes: Sizes, method: str) -> str:
    """The plan and its estimate, for the person at the terminal (and ``report.md``)."""
    s, speed, schedule = plan.budget, plan.speed, plan.schedule
    grid = ", ".join(f"{lr:g}" for lr in plan.lrs)
    per_epoch = schedule.per_epoch(False)
    epochs = f"{schedule.epochs} epochs of {per_epoch} steps"
    if schedule.epoch_steps:
        epochs += f" (an epoch: {per_epoch * s.batch_size} of the {sizes.train} train images, a new order each)"
    lines = [
        f"time budget {duration(plan.seconds)}; measured here: {speed.step:.3g} s per step of {s.batch_size} images "
        f"at {speed.image_size}x{speed.image_size}, {1000 * speed.score:.3g} ms per image scored",
        f"  input {s.image_size}x{s.image_size}; base lr {grid} (centre: {method}'s default {plan.centre:g}) "
        f"x weight decay {WEIGHT_DECAY:g}",
    ]
    if len(plan.lrs) > 1:
        rung = f"; successive halving at epoch {s.halving.min_epochs} keeps the top 1/{REDUCTION}" if s.halving else ""
        lines.append(f"  grid: {len(plan.lrs)} settings on train, scored on val, {epochs}{rung}")
    else:
        lines.append("  grid: one setting, nothing to score")
    lines += [
        f"  final: the chosen setting on train + val ({sizes.trainval} images), {schedule.epochs} epochs of "
        f"{schedule.per_epoch(True)} steps (longer if the grid ends early), scored on test",
        f"  estimate: measuring {duration(plan.probe_seconds)}, grid {duration(plan.costs.grid)}, final "
        f"{duration(plan.costs.final)}, report {duration(plan.costs.report)}: {duration(plan.estimate)} "
        f"of {duration(plan.seconds)}",
        *(f"  note: {note}" for note in plan.notes),
    ]
    return "\n".join(lines)


def time_plan(
    data: str,
    method: str,
    backbone: str,
    seconds: float,
    image_size: int | None = None,
    lrs: tuple[float, ...] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    replay: dict | None = None,
) -> tuple[SweepPlan, TimePlan]:
    """Measure this machine's speed and plan a sweep that fits ``seconds``: the :class:`SweepPlan` to run and the
    :class:`TimePlan` it came from (what the keeper holds it to). ``replay``: an earlier plan's record
    (:meth:`TimePlan.record`) whose measurements to plan from instead of measuring: the same plan again."""
    start, sizes = clock(), Sizes.of(data)
    measured = {speed.image_size: speed for speed in _recorded_speeds(replay)}

    def probe(size: int) -> Speed:
        spec = plan_sweep(data, method, _probe_budget(size), backbone).spec("grid", _first(), 0)
        measured[size] = measure(spec, clock=clock)
        return measured[size]

    def speed_at(size: int) -> Speed:
        if size in measured:
            return measured[size]
        nearest = min(measured, key=lambda known: (abs(known - size), -known)) if measured else None  # ties: larger
        return measured[nearest].scaled(size) if nearest else probe(size).scaled(size)

    def spent() -> float:
        return replay["estimate"]["probe"] if replay else clock() - start

    if not measured:
        probe(image_size or 112)
    plan = plan_time(seconds, sizes, speed_at, method, image_size, lrs, spent=spent())
    while plan.budget.image_size not in measured:  # chosen from a scaled estimate: measure it, plan again
        probe(plan.budget.image_size)
        plan = plan_time(seconds, sizes, speed_at, method, image_size, lrs, spent=spent())
    plan = dataclasses.replace(plan, measured=tuple(measured.values()))
    sweep = plan_sweep(data, method, plan.budget, backbone, lrs=plan.lrs, seeds=1)
    return sweep, plan


def read_time_plan(out: str | os.PathLike, inputs: dict) -> dict | None:
    """The plan recorded in ``<out>/time-plan.json`` by an earlier command with these very ``inputs`` (data, its
    sizes, method, backbone, budget, options), if any: a rerun after an interruption plans from its measurements,
    so the runs already written are the plan's runs and are kept."""
    path = Path(out) / TIME_PLAN_FILE
    try:
        recorded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # none, or a torn write: plan anew
        return None
    return recorded.get("plan") if isinstance(recorded, dict) and recorded.get("inputs") == inputs else None


def write_time_plan(out: str | os.PathLike, inputs: dict, plan: TimePlan) -> None:
    """Record ``plan`` and what it was made for in ``<out>/time-plan.json`` (before training)."""
    write_json(Path(out) / TIME_PLAN_FILE, {"inputs": inputs, "plan": plan.record()})


def _recorded_speeds(record: dict | None) -> list[Speed]:
    """The speeds a plan's record holds (none: nothing recorded)."""
    if not record:
        return []
    try:
        return [Speed(**speed) for speed in record["measured"]]
    except (KeyError, TypeError) as error:
        raise ValueError(f"a recorded time plan without its measurements ({error}): delete it to plan anew") from None


def _probe_budget(size: int) -> Budget:
    return Budget("probe", image_size=size, epochs=1, warmup_epochs=0, batch_size=BATCH, seeds=1, wds=(WEIGHT_DECAY,))


def _first() -> dict:
    return {"base_lr": 1e-3, "weight_decay": WEIGHT_DECAY, "num_tokens": None}
