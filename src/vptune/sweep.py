"""The paper's protocol for one task and one method: a grid scored on val, the best retrained with several seeds.

Every run is a plain JSON spec executed by :func:`execute_run` (locally or on a Ray worker); its result is written
to ``<out>/runs/<id>.json`` as soon as it finishes, and a rerun of the same sweep skips runs already written.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .config import to_dict
from .methods import Method, get_method, prompt_defaults

SWEEP_FILE = "sweep.json"
SUMMARY_FILE = "summary.md"


@dataclass(frozen=True)
class Budget:
    """How much compute one sweep gets: input size, schedule, grid and seeds.

    ``sgd_lrs`` / ``adamw_lrs`` / ``wds`` of ``None`` mean the method's full grid from the paper.
    ``head_only_lrs`` (when set) replaces ``sgd_lrs`` for methods whose training is cached to a head.
    """

    name: str
    image_size: int
    epochs: int
    warmup_epochs: float
    batch_size: int
    seeds: int
    sgd_lrs: tuple[float, ...] | None = None
    adamw_lrs: tuple[float, ...] | None = None
    wds: tuple[float, ...] | None = None
    head_only_lrs: tuple[float, ...] | None = None
    num_tokens: tuple[int, ...] | None = None
    note: str = ""


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
        "cached to a head (linear, mlp-k), {0.1, 0.025} for the other SGD methods, AdamW 0.0005 alone",
    ),
    "paper": Budget(
        "paper", image_size=224, epochs=100, warmup_epochs=10, batch_size=64, seeds=5,
        note="the paper's protocol: 224x224, 100 epochs (10 warmup), the method's full lr x wd grid, 5 seeds",
    ),
}  # fmt: skip


@dataclass
class SweepPlan:
    """The runs of one sweep: grid settings (scored on val) and the seeds of the final retraining."""

    task: str
    method: str
    backbone: str
    budget: Budget
    lrs: tuple[float, ...]
    wds: tuple[float, ...]
    num_tokens: tuple[int | None, ...]
    seeds: int
    options: dict = field(default_factory=dict)

    @property
    def settings(self) -> list[dict]:
        """Grid points, ordered so that ties on val accuracy go to the smaller lr (then wd, then prompt length)."""
        points = itertools.product(sorted(self.lrs), sorted(self.wds), self.num_tokens)
        return [{"base_lr": lr, "weight_decay": wd, "num_tokens": tokens} for lr, wd, tokens in points]

    def grid_runs(self) -> list[dict]:
        """One run per setting on train800, scored on val200 at the last epoch (none when there is one setting)."""
        if len(self.settings) == 1:
            return []
        return [self.run_spec("grid", setting, seed=0) for setting in self.settings]

    def final_runs(self, setting: dict) -> list[dict]:
        """The chosen setting retrained on train800val200 with each seed, scored on test."""
        return [self.run_spec("final", setting, seed) for seed in range(self.seeds)]

    def run_spec(self, stage: str, setting: dict, seed: int) -> dict:
        spec, _ = get_method(self.method)
        prompt = dict(prompt_defaults(self.method))
        if setting["num_tokens"] is not None:
            prompt["num_tokens"] = setting["num_tokens"]
        grid = stage == "grid"
        train = {
            "epochs": self.budget.epochs,
            "warmup_epochs": self.budget.warmup_epochs,
            "batch_size": self.budget.batch_size,
            "base_lr": setting["base_lr"],
            "weight_decay": setting["weight_decay"],
            "optimizer": spec.optimizer,
            "seed": seed,
            "train_split": "train" if grid else "trainval",
            "val_split": "val" if grid else None,
            "test_split": None if grid else "test",
            "progress": False,
        }
        run_id = f"{stage}-lr{setting['base_lr']:g}-wd{setting['weight_decay']:g}"
        run_id += (f"-p{setting['num_tokens']}" if setting["num_tokens"] is not None else "") + f"-s{seed}"
        return {
            "id": run_id,
            "stage": stage,
            "task": self.task,
            "method": self.method,
            "backbone": self.backbone,
            "image_size": self.budget.image_size,
            "prompt": prompt if spec.prompted else {},
            "options": self.options,
            "train": train,
            "setting": setting,
        }


def plan_sweep(
    task: str,
    method: str,
    budget: str | Budget = "smoke",
    backbone: str = "dinov2-small",
    lrs: Iterable[float] | None = None,
    wds: Iterable[float] | None = None,
    num_tokens: Iterable[int] | None = None,
    seeds: int | None = None,
    options: dict | None = None,
) -> SweepPlan:
    """The grid and seeds of a sweep: the budget's preset, where ``lrs``/``wds``/``num_tokens``/``seeds`` override."""
    budget = BUDGETS[budget] if isinstance(budget, str) else budget
    spec, _ = get_method(method)
    lrs = tuple(lrs) if lrs else _budget_lrs(budget, spec)
    wds = tuple(wds) if wds is not None and len(tuple(wds)) else (budget.wds or spec.wd_grid)
    tokens: tuple[int | None, ...] = (None,)
    if spec.prompted:
        tokens = tuple(num_tokens) if num_tokens else (budget.num_tokens or (prompt_defaults(method)["num_tokens"],))
    elif num_tokens:
        raise ValueError(f"method {method!r} has no prompts: drop --num-tokens")
    if any(lr <= 0 for lr in lrs) or any(wd < 0 for wd in wds) or any(t is not None and t < 1 for t in tokens):
        raise ValueError(f"grid values must be lr > 0, wd >= 0, num_tokens >= 1: got {lrs}, {wds}, {tokens}")
    seeds = seeds if seeds is not None else budget.seeds
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    return SweepPlan(task, method, backbone, budget, lrs, tuple(wds), tokens, seeds, dict(options or {}))


def _budget_lrs(budget: Budget, spec: Method) -> tuple[float, ...]:
    if spec.optimizer == "adamw":
        return budget.adamw_lrs or spec.lr_grid
    if budget.head_only_lrs and spec.name in ("linear", "mlp-<k>"):
        return budget.head_only_lrs
    return budget.sgd_lrs or spec.lr_grid


# --- running --------------------------------------------------------------------------------------
Executor = Callable[[list[dict], Callable[[dict, dict], None]], None]


def run_sweep(
    plan: SweepPlan,
    out: str | os.PathLike,
    backend: str = "local",
    ray_address: str | None = None,
    progress: Callable[[dict], None] | None = None,
    batched: int = 1,
) -> dict:
    """Run (or resume) a sweep into ``out``; return what ``sweep.json`` holds.

    Args:
        plan: from :func:`plan_sweep`.
        out: the sweep folder; ``runs/<id>.json`` per finished run, ``sweep.json`` and ``summary.md`` at the end.
        backend: ``local`` (one run after another in this process) or ``ray`` (a Ray cluster).
        ray_address: the Ray cluster to join; default a local Ray.
        progress: called with each finished run's result (e.g. to update a progress bar).
        batched: train up to this many grid settings of one prompt length together (local backend, SGD methods).
    """
    out = Path(out)
    execute = _executor(backend, ray_address, batched)
    grid = _run_all(plan.grid_runs(), out, execute, progress)
    choice = choose(grid) if grid else plan.settings[0]
    finals = _run_all(plan.final_runs(choice), out, execute, progress)
    result = summarise(plan, grid, choice, finals)
    _write_json(out / SWEEP_FILE, result)
    (out / SUMMARY_FILE).write_text(summary_markdown(result))
    return result


def _run_all(specs: list[dict], out: Path, execute: Executor, progress) -> list[dict]:
    done = {spec["id"]: _read_result(out, spec) for spec in specs}
    todo = [spec for spec in specs if done[spec["id"]] is None]

    def finished(spec: dict, result: dict) -> None:
        _write_json(out / "runs" / f"{spec['id']}.json", result)
        done[spec["id"]] = result
        if progress is not None:
            progress(result)

    for spec in specs:
        if done[spec["id"]] is not None and progress is not None:
            progress({**done[spec["id"]], "resumed": True})
    if todo:
        execute([{**spec, "save": _task_folder(out, spec)} for spec in todo], finished)
    return [done[spec["id"]] for spec in specs]


def _task_folder(out: Path, spec: dict) -> str | None:
    """Final runs keep their task folder (reloadable with vptune.load_task); grid runs keep only their scores."""
    return str(out / "tasks" / spec["id"]) if spec["stage"] == "final" else None


def _read_result(out: Path, spec: dict) -> dict | None:
    """A finished run's result, if it was written for this very spec (a changed spec runs again)."""
    path = out / "runs" / f"{spec['id']}.json"
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write from an interrupted run: run it again
    same = {key: result.get("spec", {}).get(key) for key in spec} == spec
    return result if same else None


def _executor(backend: str, ray_address: str | None, batched: int = 1) -> Executor:
    if batched > 1:
        if backend != "local":
            raise ValueError("--batched runs on the local backend; drop --backend ray or --batched")
        return lambda specs, finished: _local_batched(specs, finished, batched)
    if backend == "local":
        return _local
    if backend == "ray":
        from .distributed import ray_executor

        return ray_executor(ray_address)
    raise ValueError(f"unknown backend {backend!r}: choose local or ray")


def _local(specs: list[dict], finished: Callable[[dict, dict], None]) -> None:
    for spec in specs:
        finished(spec, execute_run(spec))


def _batched_or_alone(chunk: list[dict]) -> list[dict]:
    from .engine import TrainingDiverged

    if len(chunk) > 1:
        try:
            return execute_batched(chunk)
        except TrainingDiverged:  # one setting diverged: run them one by one so the others still score
            pass
    return [execute_run(spec) for spec in chunk]


def _local_batched(specs: list[dict], finished: Callable[[dict, dict], None], size: int) -> None:
    """Grid runs of one prompt length train ``size`` at a time; final runs (different seeds) one by one."""
    from .batched import BATCHABLE

    groups: dict[str, list[dict]] = {}
    for spec in specs:
        batchable = spec["stage"] == "grid" and spec["method"] in BATCHABLE and spec["train"]["optimizer"] == "sgd"
        key = repr(spec["prompt"]) if batchable else spec["id"]
        groups.setdefault(key, []).append(spec)
    for group in groups.values():
        for chunk in (group[i : i + size] for i in range(0, len(group), size)):
            results = _batched_or_alone(chunk)
            for spec, result in zip(chunk, results, strict=True):
                finished(spec, result)


def execute_run(spec: dict) -> dict:
    """Train one run of a sweep from its JSON spec; return its result (spec, metrics, sizes, seconds)."""
    from .engine import TrainingDiverged, fit
    from .taskfile import save_task

    start = time.perf_counter()
    task, model, config = _build_run(spec)
    try:
        metrics = fit(model, task, config)
    except TrainingDiverged as error:  # a grid point with too high an lr: scored as a failure, the sweep goes on
        metrics = {"diverged": str(error), "val_accuracy": None, "test_accuracy": None}
    if spec.get("save") and "diverged" not in metrics:
        save_task(model, spec["save"], classes=task.classes, data=task, metrics=metrics)
    return _result(spec, model, config, metrics, time.perf_counter() - start)


def execute_batched(specs: list[dict]) -> list[dict]:
    """Train several grid runs of one prompt structure in one pass (:func:`vptune.batched.fit_batched`)."""
    from .batched import fit_batched
    from .engine import load_splits

    start = time.perf_counter()
    built = [_build_run(spec) for spec in specs]
    task, model, config = built[0]
    splits = load_splits(task, config, model.image_size)
    metrics = fit_batched([b[1] for b in built], splits, [b[2] for b in built])
    seconds = (time.perf_counter() - start) / len(specs)
    return [_result(spec, b[1], b[2], m, seconds) for spec, b, m in zip(specs, built, metrics, strict=True)]


def _build_run(spec: dict):
    from .backbones import load_backbone
    from .config import from_dict
    from .data import open_task
    from .engine import TrainConfig
    from .methods import build
    from .prompts import PromptConfig

    task = open_task(spec["task"])
    backbone = _cached_backbone(spec["backbone"], load_backbone)
    prompt = from_dict(PromptConfig, spec["prompt"]) if spec["prompt"] else None
    config = from_dict(TrainConfig, spec["train"])
    model = build(
        spec["method"], backbone, task.num_classes, prompt, spec["image_size"], config.seed, **spec["options"]
    )
    return task, model, config


def _result(spec: dict, model, config, metrics: dict, seconds: float) -> dict:
    return {
        "spec": {key: value for key, value in spec.items() if key != "save"},
        "metrics": metrics,
        "trainable_parameters": model.num_trainable(),
        "backbone_parameters": model.backbone.num_parameters(),
        "tuned_parameters": model.backbone.tuned_parameters,
        "seconds": round(seconds, 2),
        "library": _version(),
        "resolved_train_config": to_dict(config.for_method(model.method)),
    }


_BACKBONES: dict[str, object] = {}


def _cached_backbone(spec: str, load):
    if spec not in _BACKBONES:
        _BACKBONES.clear()  # keep one backbone in memory per process
        _BACKBONES[spec] = load(spec)
    return _BACKBONES[spec]


def _version() -> str:
    from . import __version__

    return __version__


# --- choosing and summarising ---------------------------------------------------------------------
def choose(grid: list[dict]) -> dict:
    """The setting with the best val accuracy; ties go to the smaller lr (then wd, then prompt length)."""
    ordered = sorted(grid, key=lambda r: _tie_key(r["spec"]["setting"]))
    best = max(ordered, key=lambda r: _score(r, "val_accuracy"))  # max keeps the first of equals
    return best["spec"]["setting"]


def _score(result: dict, key: str) -> float:
    value = result["metrics"].get(key)
    return -1.0 if value is None else value  # a diverged run loses to any that finished


def _tie_key(setting: dict) -> tuple:
    return (setting["base_lr"], setting["weight_decay"], setting["num_tokens"] or 0)


def summarise(plan: SweepPlan, grid: list[dict], choice: dict, finals: list[dict]) -> dict:
    tests = [r["metrics"]["test_accuracy"] for r in finals if r["metrics"].get("test_accuracy") is not None]
    if not tests:
        raise RuntimeError(f"every final run of {plan.method} on {plan.task} diverged: lower the lr grid")
    first = finals[0]
    return {
        "task": plan.task,
        "method": plan.method,
        "backbone": plan.backbone,
        "budget": to_dict(plan.budget),
        "grid": [{"setting": r["spec"]["setting"], "val_accuracy": r["metrics"].get("val_accuracy")} for r in grid],
        "choice": choice,
        "chosen_by": "val200 accuracy at the last epoch" if grid else "single setting: no grid to score",
        "seeds": len(finals),
        "diverged_seeds": len(finals) - len(tests),
        "test_accuracy": tests,
        "test_mean": statistics.fmean(tests),
        "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "trainable_parameters": first["trainable_parameters"],
        "backbone_parameters": first["backbone_parameters"],
        "tuned_parameters": first["tuned_parameters"],
        "seconds": round(sum(r["seconds"] for r in grid + finals), 1),
        "runs": [r["spec"]["id"] for r in grid + finals],
        "library": first["library"],
    }


def summary_markdown(result: dict) -> str:
    lines = [
        f"# {result['method']} on {Path(result['task']).name}",
        "",
        f"Budget `{result['budget']['name']}`: {result['budget']['note']}.",
        "",
        "| base lr | weight decay | prompt length | val accuracy |",
        "|---|---|---|---|",
    ]
    for row in result["grid"]:
        s = row["setting"]
        val = "diverged" if row["val_accuracy"] is None else f"{100 * row['val_accuracy']:.2f}"
        lines.append(f"| {s['base_lr']:g} | {s['weight_decay']:g} | {s['num_tokens'] or '-'} | {val} |")
    c = result["choice"]
    lines += [
        "",
        f"Chosen ({result['chosen_by']}): base lr {c['base_lr']:g}, weight decay {c['weight_decay']:g}"
        + (f", {c['num_tokens']} prompt tokens" if c["num_tokens"] else "")
        + f". Test accuracy over {result['seeds']} seed(s): "
        f"**{100 * result['test_mean']:.2f}** ± {100 * result['test_std']:.2f}.",
        "",
    ]
    return "\n".join(lines)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
