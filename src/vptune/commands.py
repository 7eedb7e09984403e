"""What each ``vptune`` command does; argument parsing lives in :mod:`vptune.cli` (nothing here imports it)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbones import load_backbone
from .backbones.mocov3 import convert_mocov3 as convert_checkpoint
from .bench import DEFAULT_METHODS, SUITE, plan_bench, run_bench
from .config import read_config_file
from .data import Carving, load_split, open_task
from .distributed import is_main
from .engine import TrainConfig, resolve_device
from .engine import evaluate as evaluate_model
from .export import check_export, export_onnx
from .methods import METHODS, get_method
from .model import TaskModel
from .preprocessing import DataError
from .ray_serve import serve_ray
from .report import file_bytes, human_bytes, markdown_table, params_multiple, task_summary, top_classes
from .runs import RunResult, RunSpec, run, used_splits
from .serve import ServeConfig, serve_folders
from .sweep import SUMMARY_FILE, get_budget, make_executor, plan_sweep, run_sweep
from .sweep.keeper import Timekeeper
from .sweep.report import BEST_FOLDER, REPORT_FILE
from .sweep.timing import (
    TIME_PLAN_FILE,
    Sizes,
    describe,
    duration,
    estimate,
    measure,
    parse_duration,
    read_time_plan,
    time_plan,
    write_time_plan,
)
from .taskfile import check_task, load_task, push_task, read_record


def train(args: argparse.Namespace) -> int:
    """Train one task: flags override --config, which overrides the defaults; config.json records the resolved run."""
    file = read_config_file(args.config) if args.config else {}
    out = args.out or file.pop("out", None)
    spec = RunSpec.from_layers(file, args.layer or {}, where=args.config or "flags")
    asked = {**file, **(args.layer or {})}.get("method", spec.method)  # a recipe's own name, not its method's
    out = Path(out or f"runs/{Path(spec.data).name}-{asked}")
    _tell(open_task(spec.data).describe(used_splits(spec.train)))
    run(spec, out)
    if is_main():  # under torchrun only rank 0 writes
        print(json.dumps({"run": str(out), **task_summary(read_record(out), out)}, indent=2, allow_nan=False))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Score a trained task folder on a split of its task (or of --data)."""
    model = _load(args)
    data = read_record(args.run_dir).get("data") or {}
    if not (args.data or data.get("path")):
        raise ValueError(f"{args.run_dir} records no task data: pass --data NAME_OR_FOLDER")
    task = open_task(args.data or data["path"], Carving.recorded(data))  # carved splits as the run carved them
    dataset = load_split(task, args.split, model.preprocessing)
    scores = evaluate_model(model, dataset, device=resolve_device("auto"))
    result = {"run": args.run_dir, "data": str(task.root), "split": args.split, **scores}
    print(
        json.dumps(result, allow_nan=False)
        if args.json
        else f"{task.name} {args.split}: accuracy {scores['accuracy']:.4f} "
        f"({scores['count']} images), loss {scores['loss']:.4f}"
    )
    return 0


def predict(args: argparse.Namespace) -> int:
    """Top-k class names and probabilities for each image; an image that cannot be read is reported beside the
    others' answers (and the exit status is 1)."""
    model = _load(args)
    answers = [_answer(model, image, args.top_k) for image in args.images]
    if args.json:
        print(json.dumps(answers, indent=2, allow_nan=False))
    for answer in answers if not args.json else []:
        best = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in answer.get("top", []))
        print(f"{answer['image']}: {best or 'error: ' + answer['error']}")
    failed = [answer["image"] for answer in answers if "error" in answer]
    if failed:
        print(f"vptune predict: {len(failed)} of {len(answers)} images could not be classified", file=sys.stderr)
    return 1 if failed else 0


def _answer(model: TaskModel, image: str, top_k: int) -> dict:
    """One image's top-k classes, or what went wrong with it."""
    path = Path(image)
    if not path.is_file():  # a folder, a missing file, a pipe that would block the read
        return {"image": image, "error": "not a regular file"}
    try:
        pixels = model.preprocessing(path).unsqueeze(0).to(next(model.parameters()).device)
    except DataError as error:
        return {"image": image, "error": str(error)}
    with torch.no_grad():
        probs = model(pixels).float().softmax(dim=-1)[0]
    if not torch.isfinite(probs).all():
        return {"image": image, "error": "the model gives NaN or infinite scores for it"}
    return {"image": image, "top": top_classes(probs, model.classes, top_k)}


def inspect(args: argparse.Namespace) -> int:
    """Method, trainable parameters and their share of the backbone, file bytes, backbone, metrics; the weights file is
    checked against the record (a damaged folder is an error)."""
    record = check_task(args.run_dir)
    summary = task_summary(record, Path(args.run_dir))
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False))
        return 0
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _load(args: argparse.Namespace):
    backbone = load_backbone(args.backbone) if args.backbone else None
    model = load_task(args.run_dir, backbone=backbone, allow_other_backbone=args.allow_other_backbone)
    return model.to(resolve_device("auto"))


def demo(args: argparse.Namespace) -> int:
    """Train methods (default: linear, VPT-Shallow, VPT-Deep) on a task (train + val -> test); print one table."""
    methods = args.methods.split(",") if args.methods else demo_methods()
    for method in methods:
        get_method(method)  # an unknown name fails before any work
    task = open_task(args.data)
    _tell(task.describe(("trainval", "test")))
    rows = []
    for method in methods:
        spec = demo_spec(method, args)
        print(f"[demo] {method}: {spec.train.epochs} epochs at {args.image_size}x{args.image_size} on {task.name}")
        result = run(spec, Path(args.out) / method, every_epoch=False)
        rows.append(_demo_row(method, result, Path(args.out) / method))
    print()
    print(
        f"{task.name}, {args.image_size}x{args.image_size}, backbone {args.backbone}; trained on train + val, "
        "scored on test"
    )
    print(markdown_table(rows))
    if args.json:
        print(json.dumps(rows, indent=2, allow_nan=False))
    return 0


def demo_methods() -> list[str]:
    """The demo's default methods, in their table order."""
    ranked = [(method.demo_rank, name) for name, method in METHODS.items() if method.demo_rank is not None]
    return [name for _, name in sorted(ranked)]


def demo_spec(method: str, args: argparse.Namespace) -> RunSpec:
    """A demo run: the method's short schedule and defaults, trained on train + val, scored on test; ``--epochs``
    replaces the schedule's length and warmup (then a tenth of the run)."""
    registered = get_method(method)[0]
    schedule = {**registered.demo, **({"epochs": args.epochs, "warmup_epochs": None} if args.epochs else {})}
    train = TrainConfig(batch_size=32, weight_decay=1e-4, train_split="trainval", val_split=None, **schedule)
    return RunSpec(args.data, method, args.backbone, args.image_size, registered.prompt_config(), train=train)


def _demo_row(method: str, result: RunResult, folder: Path) -> dict:
    record = read_record(folder)
    epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epoch_seconds = [line["seconds"] for line in epochs if not line.get("final")]
    trainable, backbone, config = record["trainable_parameters"], record["backbone"]["parameters"], result.spec.train
    return {
        "method": method,  # as asked: a recipe by its own name
        "trainable params": f"{trainable:,}",
        "% of backbone": f"{100 * trainable / backbone:.3f}%",
        "task file": human_bytes(file_bytes(folder)),
        "total params (24 tasks)": f"{params_multiple(record):.2f}x",
        "optimizer, base lr": f"{config.optimizer} {config.base_lr:g}",
        "test accuracy": f"{100 * record['metrics']['test_accuracy']:.2f}",
        "s/epoch": f"{sum(epoch_seconds) / len(epoch_seconds):.3g}"
        + (" (cached)" if epochs[-1]["cached_from"] else ""),
        "train+eval time": f"{result.seconds:.0f} s",
    }


def sweep(args: argparse.Namespace) -> int:
    """Grid on train scored on val, the best (ties: smaller lr) retrained on train + val with seeds; the seed-0 model
    lands in <out>/best, the report in <out>/report.md. The plan and its estimate are printed before training; with
    --time-budget, the plan is made to fit the time and the sweep keeps to it."""
    start = time.perf_counter()
    seconds = parse_duration(args.time_budget) if args.time_budget else None
    if seconds is not None:
        _check_time_options(args)
    task = open_task(args.data)
    _tell(task.describe())
    sizes = Sizes.of(str(task.root))
    if seconds is not None:
        lrs = tuple(args.base_lr) if args.base_lr else None
        inputs = {
            "data": str(task.root), "sizes": dataclasses.asdict(sizes), "method": args.method,
            "backbone": args.backbone, "seconds": seconds, "image_size": args.image_size, "lrs": lrs and list(lrs),
        }  # fmt: skip
        replay = read_time_plan(args.out, inputs)
        if replay is not None:
            _tell(f"resuming the plan in {Path(args.out) / TIME_PLAN_FILE}: its measurements, and the runs written")
        plan, timed = time_plan(str(task.root), args.method, args.backbone, seconds, args.image_size, lrs,
                                replay=replay)  # fmt: skip
        text, costs = describe(timed, sizes, args.method), timed.costs
        if not args.dry_run:
            write_time_plan(args.out, inputs, timed)
    else:
        timed = None
        plan = plan_sweep(
            str(task.root), args.method, _sized(args.budget, args.image_size), args.backbone, args.base_lr,
            args.weight_decay, args.num_tokens, args.seeds,
        )  # fmt: skip
        costs = estimate(plan, measure(plan.spec("grid", plan.settings[0], 0)), sizes)
        text = (
            f"estimate on this machine: measuring {duration(time.perf_counter() - start)}, grid "
            f"{duration(costs.grid)}, final {duration(costs.final)}, report {duration(costs.report)}: about "
            f"{duration(time.perf_counter() - start + costs.total)} in all"
        )
    _tell(text)
    if args.dry_run:
        return 0
    with Timekeeper(timed, sizes, costs, start, progress=args.progress, text=text) as keeper:
        run_sweep(plan, args.out, make_executor(args.backend, args.ray_address, args.batched), keeper=keeper)
    print((Path(args.out) / SUMMARY_FILE).read_text())
    print(f"tuned model: {Path(args.out) / BEST_FOLDER}")
    print(f"report: {Path(args.out) / REPORT_FILE}")
    budget = f" (time budget {duration(seconds)})" if seconds is not None else ""
    print(f"wall time: {duration(time.perf_counter() - start)}{budget}")
    return 0


def _check_time_options(args: argparse.Namespace) -> None:
    """What --time-budget plans itself cannot also be given."""
    options = (("--budget", args.budget), ("--seeds", args.seeds), ("--weight-decay", args.weight_decay))
    given = [flag for flag, value in (*options, ("--num-tokens", args.num_tokens)) if value is not None]
    if args.backend != "local" or args.batched > 1:
        raise ValueError(
            "a time budget re-plans epoch by epoch, one run at a time, here: drop --backend ray and --batched"
        )
    if given:
        raise ValueError(
            f"--time-budget plans the schedule, grid and seeds itself: drop {', '.join(given)} (or drop --time-budget "
            "and choose a --budget preset)"
        )


def _sized(budget: str | None, image_size: int | None):
    """A preset budget, at another input size if one is given."""
    preset = get_budget(budget or "smoke")
    return dataclasses.replace(preset, image_size=image_size) if image_size else preset


def _tell(text: str) -> None:
    """A note for the person at the terminal (stderr, so that --json output stays clean)."""
    if is_main():
        print(text, file=sys.stderr, flush=True)


def bench(args: argparse.Namespace) -> int:
    """One sweep per task x method, then the paper-style table (markdown, CSV) and figures (PNG)."""
    tasks = args.tasks.split(",") if args.tasks else list(SUITE)
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    for method in methods:
        get_method(method)  # an unknown name fails before any work
    roots = [str(open_task(task).root) for task in tasks]  # a missing task too
    plans = plan_bench(roots, methods, args.budget or "smoke", args.backbone, seeds=args.seeds)
    total = sum(len(plan.grid_runs()) + plan.seeds for plan in plans.values())
    with _RunProgress(total, args.progress) as progress:
        execute = make_executor(args.backend, args.ray_address, args.batched)
        summary = run_bench(plans, args.out, execute, progress.update)
    print((Path(args.out) / "bench.md").read_text())
    print(f"{len(plans)} sweeps in {summary['seconds']:.0f} s; table, CSV and figures in {args.out}")
    return 0


class _RunProgress:
    """Runs done / total with the time left, as runs finish (resumed runs count at once)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, desc="runs", unit="run", disable=not enabled)

    def update(self, result: dict) -> None:
        entry = result["entry"]
        self.bar.set_postfix_str(f"{Path(entry['run']['data']).name} {entry['run']['method']} {entry['id']}")
        self.bar.update(1)

    def __enter__(self) -> _RunProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def serve(args: argparse.Namespace) -> int:
    """Serve task folders over one frozen backbone: GET /tasks, POST /predict, POST/DELETE /tasks, /health, /metrics."""
    config = ServeConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ServeConfig)})
    if args.backend == "ray":
        if config.task_root is None or args.runs:
            raise ValueError("--backend ray serves the task folders under --task-root DIR (no RUN folders): give it")
        options = {"max_resident": args.max_resident, "replicas": args.replicas, "address": args.ray_address}
        serve_ray(config.task_root, args.backbone, args.host, args.port, config, **options)
        return 0
    if args.lazy and config.task_root is None:
        raise ValueError("--lazy serves the task folders under --task-root DIR: give it")
    if not args.runs and not args.lazy:
        raise ValueError("name task folders to serve, or --lazy --task-root DIR to serve every one under DIR")
    if args.max_resident is not None and not args.lazy:
        raise ValueError("--max-resident bounds what --lazy loads: add --lazy --task-root DIR")
    lazy = {"lazy": args.lazy, "max_resident": args.max_resident}
    serve_folders(args.runs, args.backbone, args.host, args.port, config, **lazy)
    return 0


def export(args: argparse.Namespace) -> int:
    """Write a task as an ONNX graph (a task graph, or its structure's graph), checked against PyTorch before it is
    reported written."""
    if args.format != "onnx":
        raise ValueError(f"--format {args.format!r}: vptune exports onnx (ONNX Runtime, TensorRT through ONNX)")
    backbone = load_backbone(args.backbone) if args.backbone else None
    model = load_task(args.run_dir, backbone=backbone, allow_other_backbone=args.allow_other_backbone)
    out = export_onnx(model, args.out, structure=args.structure, int8=args.int8)
    difference = check_export(model, out)
    print(f"wrote {out} ({Path(out).stat().st_size / 2**20:.1f} MiB); max |ONNX Runtime - PyTorch| {difference:.2e}")
    return 0


def push(args: argparse.Namespace) -> int:
    """Upload a task folder (record, weights, a generated model card) to a Hub model repository."""
    url = push_task(args.run_dir, args.repo, token=args.token, private=args.private, revision=args.revision)
    print(f"pushed {args.run_dir} to {args.repo}: {url}\nload it with vptune.load_task('hf://{args.repo}')")
    return 0


def convert_mocov3(args: argparse.Namespace) -> int:
    """Write a MoCo-v3 ViT checkpoint (.pth.tar, read without unpickling code) as a transformers ViT folder, to use
    as --backbone hf:OUT_FOLDER (class-token read-out, ImageNet normalisation)."""
    out = convert_checkpoint(args.checkpoint, args.out_folder, encoder=args.encoder, heads=args.heads)
    print(f"wrote {out}: use it as --backbone hf:{out}")
    return 0
