"""What each ``vptune`` subcommand does; argument parsing lives in :mod:`vptune.cli`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .backbones import load_backbone
from .config import from_dict
from .data import Preprocess, decode_image, eval_view, load_split, normalize, open_task
from .distributed import is_main
from .engine import TrainConfig, fit, resolve_device
from .engine import evaluate as evaluate_model
from .methods import build, get_method, prompt_defaults
from .prompts import PromptConfig
from .report import file_bytes, human_bytes, markdown_table, params_multiple, task_summary
from .taskfile import load_task, read_record, save_task


def train(args: argparse.Namespace) -> int:
    """Train one task: flags override --config, which overrides the defaults; the resolved config is saved."""
    from .cli import resolve_run_config, write_resolved

    resolved = resolve_run_config(args)
    prompt = from_dict(PromptConfig, resolved["prompt"], where="prompt options")
    config = from_dict(TrainConfig, resolved["train"], where="train options")
    task = open_task(resolved["data"])
    backbone = load_backbone(resolved["backbone"])
    model = build(
        resolved["method"],
        backbone,
        len(task.classes),
        prompt,
        resolved["image_size"],
        seed=config.seed,
        **resolved["options"],
    )
    config = config.for_method(model.method)
    resolved["image_size"] = model.image_size
    if is_main():
        write_resolved(resolved, model.prompt_config, config, model.options)
    out = Path(resolved["out"])

    def save(metrics: dict) -> None:  # after every epoch, so an interrupted run keeps its last finished epoch
        save_task(model, out, classes=task.classes, data=task, metrics=metrics)

    metrics = fit(model, task, config, out_dir=out, on_epoch_end=save)
    if is_main():  # under torchrun only rank 0 writes
        save(metrics)
        print(json.dumps({"run": str(out), **task_summary(read_record(out), out)}, indent=2))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Score a trained task folder on a split of its task (or of --data)."""
    model = _load(args)
    task = open_task(args.data or model.record.get("data", {}).get("path") or _no_data(args.run_dir))
    dataset = load_split(task, args.split, model.image_size)
    device = resolve_device("auto")
    scores = evaluate_model(model.to(device), dataset, device=device)
    result = {"run": args.run_dir, "data": str(task.root), "split": args.split, **scores}
    print(
        json.dumps(result)
        if args.json
        else f"{task.name} {args.split}: accuracy {scores['accuracy']:.4f} "
        f"({scores['count']} images), loss {scores['loss']:.4f}"
    )
    return 0


def _no_data(run_dir: str) -> str:
    raise ValueError(f"{run_dir} records no task data: pass --data NAME_OR_FOLDER")


def predict(args: argparse.Namespace) -> int:
    """Top-k class names and probabilities for each image."""
    model = _load(args)
    prep = model.record["preprocessing"]
    preprocess = Preprocess(prep["image_size"], prep.get("protocol", "vtab"))
    answers = []
    for image in args.images:
        pixels = eval_view(decode_image(Path(image), preprocess), preprocess).unsqueeze(0)
        with torch.no_grad():
            probs = model(normalize(pixels, prep["mean"], prep["std"])).softmax(dim=-1)[0]
        top = probs.topk(min(args.top_k, probs.numel()))
        labels = [
            {"class": model.classes[i], "label": int(i), "probability": round(float(p), 6)}
            for p, i in zip(top.values, top.indices, strict=True)
        ]
        answers.append({"image": image, "top": labels})
    if args.json:
        print(json.dumps(answers, indent=2))
    for answer in answers if not args.json else []:
        best = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in answer["top"])
        print(f"{answer['image']}: {best}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    """Method, trainable parameters and their share of the backbone, file bytes, backbone, metrics."""
    record = read_record(args.run_dir)
    summary = task_summary(record, Path(args.run_dir))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _load(args: argparse.Namespace):
    backbone = load_backbone(args.backbone) if args.backbone else None
    model = load_task(args.run_dir, backbone=backbone, allow_other_backbone=args.allow_other_backbone)
    return model.to(resolve_device("auto"))


# Per-method settings of the demo: a short schedule that fits ~10 minutes on a 2-core CPU at 112x112.
DEMO_METHODS: dict[str, tuple[dict, dict]] = {
    "linear": ({}, {"epochs": 5, "warmup_epochs": 1, "base_lr": 0.2}),
    "vpt-shallow": ({"num_tokens": 10}, {"epochs": 4, "warmup_epochs": 1, "base_lr": 0.1}),
    "vpt-deep": ({"num_tokens": 10, "dropout": 0.1, "deep": True}, {"epochs": 4, "warmup_epochs": 1, "base_lr": 0.1}),
}
# Any other method: its default prompt options, 4 epochs with one warmup epoch, its default optimiser and base lr.
OTHER_METHODS: tuple[dict, dict] = ({}, {"epochs": 4, "warmup_epochs": 1})


def demo(args: argparse.Namespace) -> int:
    """Train methods (default: linear, VPT-Shallow, VPT-Deep) on a task (train800val200 -> test); print one table."""
    methods = args.methods.split(",") if args.methods else list(DEMO_METHODS)
    for method in methods:
        get_method(method)  # an unknown name fails before any work
    task = open_task(args.data)
    backbone = load_backbone(args.backbone)
    rows = []
    for method in methods:
        prompt_options, train_options = DEMO_METHODS.get(method, OTHER_METHODS)
        if args.epochs:
            train_options = {**train_options, "epochs": args.epochs}
        config = TrainConfig(batch_size=32, weight_decay=1e-4, train_split="trainval", val_split=None, **train_options)
        config = config.for_method(method)
        prompt = PromptConfig(**{**prompt_defaults(method), **prompt_options})
        model = build(method, backbone, len(task.classes), prompt, args.image_size, seed=config.seed)
        print(f"[demo] {method}: {config.epochs} epochs at {args.image_size}x{args.image_size} on {task.name}")
        start = time.perf_counter()
        metrics = fit(model, task, config, out_dir=Path(args.out) / method)
        folder = save_task(model, Path(args.out) / method, classes=task.classes, data=task, metrics=metrics)
        rows.append(_demo_row(model, config, folder, time.perf_counter() - start))
    print()
    print(f"{task.name}, {args.image_size}x{args.image_size}, backbone {backbone.spec}; train800val200 -> test")
    print(markdown_table(rows))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _demo_row(model, config: TrainConfig, folder: Path, seconds: float) -> dict:
    record = read_record(folder)
    epochs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epoch_seconds = [line["seconds"] for line in epochs if not line.get("final")]
    trainable, backbone = record["trainable_parameters"], record["backbone"]["parameters"]
    return {
        "method": model.method,
        "trainable params": f"{trainable:,}",
        "% of backbone": f"{100 * trainable / backbone:.3f}%",
        "task file": human_bytes(file_bytes(folder)),
        "total params (24 tasks)": f"{params_multiple(record):.2f}x",
        "optimizer, base lr": f"{config.optimizer} {config.base_lr:g}",
        "test accuracy": f"{100 * record['metrics']['test_accuracy']:.2f}",
        "s/epoch": f"{sum(epoch_seconds) / len(epoch_seconds):.3g}"
        + (" (cached)" if epochs[-1]["cached_from"] else ""),
        "train+eval time": f"{seconds:.0f} s",
    }


def sweep(args: argparse.Namespace) -> int:
    """Grid on train800 scored on val200, the best (ties: smaller lr) retrained on train800val200 with seeds."""
    from .sweep import plan_sweep, run_sweep

    plan = plan_sweep(
        str(open_task(args.data).root), args.method, args.budget, args.backbone, args.lr, args.wd, args.num_tokens,
        args.seeds,
    )  # fmt: skip
    total = len(plan.grid_runs()) + plan.seeds
    with _RunProgress(total, args.progress) as progress:
        result = run_sweep(plan, args.out, args.backend, args.ray_address, progress.update, args.batched)
    print((Path(args.out) / "summary.md").read_text())
    return 0 if result else 1


def bench(args: argparse.Namespace) -> int:
    """One sweep per task x method, then the paper-style table (markdown, CSV) and figures (PNG)."""
    from .bench import DEFAULT_METHODS, SUITE, plan_bench, run_bench

    tasks = args.tasks.split(",") if args.tasks else list(SUITE)
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    roots = [str(open_task(task).root) for task in tasks]  # a missing task fails before any training
    plans = plan_bench(roots, methods, args.budget, args.backbone, seeds=args.seeds)
    total = sum(len(plan.grid_runs()) + plan.seeds for plan in plans.values())
    with _RunProgress(total, args.progress) as progress:
        summary = run_bench(plans, args.out, args.backend, args.ray_address, progress.update, args.batched)
    print((Path(args.out) / "bench.md").read_text())
    print(f"{len(plans)} sweeps in {summary['seconds']:.0f} s; table, CSV and figures in {args.out}")
    return 0


class _RunProgress:
    """Runs done / total with the time left, as runs finish (resumed runs count at once)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="runs", unit="run", disable=not enabled)

    def update(self, result: dict) -> None:
        spec = result["spec"]
        self.bar.set_postfix_str(f"{Path(spec['task']).name} {spec['method']} {spec['id']}", refresh=False)
        self.bar.update(1)

    def __enter__(self) -> _RunProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def serve(args: argparse.Namespace) -> int:
    """Serve task folders over one frozen backbone: GET /tasks, POST /predict, POST/DELETE /tasks, /health, /metrics."""
    from .serve import ServeConfig
    from .serve import serve as run_server

    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, top_k=args.top_k)
    run_server(args.runs, args.backbone, args.host, args.port, config)
    return 0
