"""What a sweep runs: the budget's schedule and grid, each grid point and each final seed as a :class:`RunSpec`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from ..engine import TrainConfig
from ..methods import Method, get_method
from ..runs import RunSpec


@dataclass(frozen=True)
class Halving:
    """Successive halving of a sweep's grid (Optuna's ``SuccessiveHalvingPruner``, see :mod:`.halving`).

    At epoch ``min_epochs * reduction_factor**k`` (k = 0, 1, ...; never the last epoch) a grid run goes on only if
    its val accuracy is in the top ``1 / reduction_factor`` of the runs that reached that epoch before it.
    """

    min_epochs: int
    reduction_factor: int

    def __post_init__(self) -> None:
        if self.min_epochs < 1 or self.reduction_factor < 2:
            raise ValueError(
                f"Halving: min_epochs must be >= 1 and reduction_factor >= 2, got {self.min_epochs} and "
                f"{self.reduction_factor}"
            )


@dataclass(frozen=True)
class Budget:
    """How much compute one sweep gets: input size, schedule, grid and seeds.

    ``sgd_lrs`` / ``adamw_lrs`` / ``wds`` of ``None`` mean the method's full grid from the paper.
    ``head_only_lrs`` (when set) replaces ``sgd_lrs`` for methods that train only a head.
    ``warmup_epochs`` of ``None`` means a tenth of the epochs (the paper's 10 of 100).
    ``halving`` (when set) stops grid runs whose val accuracy trails early (successive halving, local runs only).
    ``epoch_steps`` (when set) caps an epoch's steps (a schedule in steps, as a time budget plans it).
    """

    name: str
    image_size: int
    epochs: int
    warmup_epochs: float | None
    batch_size: int
    seeds: int
    sgd_lrs: tuple[float, ...] | None = None
    adamw_lrs: tuple[float, ...] | None = None
    wds: tuple[float, ...] | None = None
    head_only_lrs: tuple[float, ...] | None = None
    num_tokens: tuple[int, ...] | None = None
    note: str = ""
    halving: Halving | None = None
    epoch_steps: int | None = None


BUDGETS: dict[str, Budget] = {
    "smoke": Budget(
        "smoke", image_size=28, epochs=1, warmup_epochs=0, batch_size=64, seeds=1,
        sgd_lrs=(0.1, 0.05), adamw_lrs=(0.001, 0.0005), wds=(0.0001, 0.0), num_tokens=(2,),
        note="CPU minutes: 28x28 input, 1 epoch, a 2x2 grid, 1 seed; checks the machinery, not accuracy",
    ),
    "cpu": Budget(
        "cpu", image_size=56, epochs=8, warmup_epochs=1, batch_size=32, seeds=1,
        sgd_lrs=(0.1, 0.025), adamw_lrs=(0.0005,), wds=(0.0001,), head_only_lrs=(0.4, 0.2, 0.1, 0.05),
        note="about 85 minutes on a 2-core CPU for linear, vpt-shallow and vpt-deep over the 9 tasks: 56x56 input, "
        "8 epochs (1 warmup), batch 32, 1 seed; grid x wd {1e-4}: base lr {0.4, 0.2, 0.1, 0.05} for methods "
        "that train only a head (linear, mlp-k), {0.1, 0.025} for the other SGD methods, AdamW 0.0005 alone",
    ),
    "paper": Budget(
        "paper", image_size=224, epochs=100, warmup_epochs=10, batch_size=64, seeds=5,
        note="the paper's protocol: 224x224, 100 epochs (10 warmup), the method's full lr x wd grid, 5 seeds",
    ),
    "cpu-tune": Budget(
        "cpu-tune", image_size=112, epochs=6, warmup_epochs=None, batch_size=32, seeds=1,
        sgd_lrs=(0.4, 0.2, 0.1, 0.05, 0.025), head_only_lrs=(1.6, 0.8, 0.4, 0.2, 0.1),
        adamw_lrs=(0.001, 0.0005, 0.00025), wds=(0.0001,), halving=Halving(min_epochs=2, reduction_factor=3),
        note="one method on your own dataset of a few thousand images on a CPU (2 cores, eurosat's 800 train, 200 val, "
        "2000 test images: vpt-deep 19.5 minutes, linear 1.6): 112x112 input, "
        "6 epochs (a tenth warmup), batch 32, 1 seed; grid x wd {1e-4}: base lr {1.6, 0.8, 0.4, 0.2, 0.1} for "
        "methods that train only a head (linear, mlp-k), {0.4, 0.2, 0.1, 0.05, 0.025} for the other SGD methods, "
        "AdamW {0.001, 0.0005, 0.00025}; successive halving (needs optuna: pip install 'vptune[tune]') stops a "
        "setting at epoch 2 unless its val accuracy is in the top third of the settings run before it",
    ),
    "gpu": Budget(
        "gpu", image_size=224, epochs=100, warmup_epochs=10, batch_size=64, seeds=3,
        sgd_lrs=(0.5, 0.25, 0.1, 0.05), head_only_lrs=(1.0, 0.5, 0.25, 0.1), adamw_lrs=(0.001, 0.0005), wds=(0.0001,),
        note="the paper's schedule on a GPU with a reduced grid: 224x224, 100 epochs (10 warmup), batch 64, 3 seeds; "
        "grid x wd {1e-4}: base lr {1, 0.5, 0.25, 0.1} for methods that train only a head, {0.5, 0.25, 0.1, 0.05} "
        "for the other SGD methods, AdamW {0.001, 0.0005}: the paper's values around the ones the cpu budget chose "
        "on DINOv2-S (VPT-Deep: the top of its grid on every task), not its lrs of 1 to 50 made for ViT-B/16's smaller "
        "features; benchmarks/gpu-bench.sh advances it resumably",
    ),
}  # fmt: skip


def get_budget(budget: str | Budget) -> Budget:
    """A budget by name (or the budget itself)."""
    if isinstance(budget, Budget):
        return budget
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    return BUDGETS[budget]


@dataclass
class SweepPlan:
    """The runs of one sweep: grid settings (scored on val) and the seeds of the final retraining."""

    data: str
    method: str
    backbone: str
    budget: Budget
    lrs: tuple[float, ...]
    wds: tuple[float, ...]
    num_tokens: tuple[int | None, ...]
    seeds: int

    @property
    def settings(self) -> list[dict]:
        """Grid points, ordered so that ties on val accuracy go to the smaller lr (then wd, then prompt length)."""
        points = itertools.product(sorted(self.lrs), sorted(self.wds), self.num_tokens)
        return [{"base_lr": lr, "weight_decay": wd, "num_tokens": tokens} for lr, wd, tokens in points]

    def grid_runs(self) -> list[dict]:
        """One run per setting on train, scored on val at the last epoch (none when there is one setting)."""
        if len(self.settings) == 1:
            return []
        return [self.entry("grid", setting, seed=0) for setting in self.settings]

    def final_runs(self, setting: dict) -> list[dict]:
        """The chosen setting retrained on train + val with each seed, scored on test."""
        return [self.entry("final", setting, seed) for seed in range(self.seeds)]

    def entry(self, stage: str, setting: dict, seed: int) -> dict:
        """One run of the sweep: its id, stage, grid setting and :class:`RunSpec` (as JSON)."""
        run_id = f"{stage}-lr{setting['base_lr']:g}-wd{setting['weight_decay']:g}"
        run_id += (f"-p{setting['num_tokens']}" if setting["num_tokens"] is not None else "") + f"-s{seed}"
        return {"id": run_id, "stage": stage, "setting": setting, "run": self.spec(stage, setting, seed).to_dict()}

    def spec(self, stage: str, setting: dict, seed: int) -> RunSpec:
        """The run of one grid setting and seed: grid runs train on train and score val, finals trainval and test."""
        method, grid = get_method(self.method)[0], stage == "grid"
        train = TrainConfig(
            epochs=self.budget.epochs, warmup_epochs=self.budget.warmup_epochs, batch_size=self.budget.batch_size,
            epoch_steps=self.budget.epoch_steps,
            base_lr=setting["base_lr"], weight_decay=setting["weight_decay"], optimizer=method.optimizer, seed=seed,
            train_split="train" if grid else "trainval", val_split="val" if grid else None,
            test_split=None if grid else "test", progress=False,
        )  # fmt: skip
        prompt = method.prompt_config()
        if prompt is not None and setting["num_tokens"] is not None:
            prompt = dataclasses.replace(prompt, num_tokens=setting["num_tokens"])
        return RunSpec(self.data, self.method, self.backbone, self.budget.image_size, prompt, train=train)


def plan_sweep(
    data: str,
    method: str,
    budget: str | Budget = "smoke",
    backbone: str = "dinov2-small",
    lrs: Iterable[float] | None = None,
    wds: Iterable[float] | None = None,
    num_tokens: Iterable[int] | None = None,
    seeds: int | None = None,
) -> SweepPlan:
    """The grid and seeds of a sweep: the budget's preset, where ``lrs``/``wds``/``num_tokens``/``seeds`` override."""
    budget = get_budget(budget)
    spec, _ = get_method(method)
    lrs = tuple(lrs) if lrs else _budget_lrs(budget, spec)
    wds = tuple(wds) if wds is not None and len(tuple(wds)) else (budget.wds or spec.wd_grid)
    tokens: tuple[int | None, ...] = (None,)
    if spec.prompted:
        tokens = tuple(num_tokens) if num_tokens else (budget.num_tokens or (spec.prompt["num_tokens"],))
    elif num_tokens:
        raise ValueError(f"method {method!r} has no prompts: drop --num-tokens")
    if any(lr <= 0 for lr in lrs) or any(wd < 0 for wd in wds) or any(t is not None and t < 1 for t in tokens):
        raise ValueError(f"grid values must be lr > 0, wd >= 0, num_tokens >= 1: got {lrs}, {wds}, {tokens}")
    seeds = seeds if seeds is not None else budget.seeds
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    return SweepPlan(data, method, backbone, budget, lrs, tuple(wds), tokens, seeds)


def _budget_lrs(budget: Budget, method: Method) -> tuple[float, ...]:
    if method.optimizer == "adamw":
        return budget.adamw_lrs or method.lr_grid
    if budget.head_only_lrs and method.head_only:
        return budget.head_only_lrs
    return budget.sgd_lrs or method.lr_grid
