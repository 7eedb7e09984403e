"""Cached vs uncached frozen trunk, side by side in one run: seconds per epoch of a method on a real task.

    python benchmarks/cache_speed.py --method linear --data eurosat --image-size 112 --epochs 2

Both runs use the same seed, data and schedule; the script also reports how far apart the trained tensors end up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import vptune
from vptune.engine import Splits, TrainConfig, load_splits


def run(method: str, backbone: vptune.Backbone, splits: Splits, classes: int, size: int, config: TrainConfig) -> dict:
    model = vptune.build(method, backbone, classes, image_size=size, seed=config.seed)
    history: list[dict] = []
    start = time.perf_counter()
    metrics = vptune.fit(model, splits, config, on_epoch_end=history.append)
    total = time.perf_counter() - start
    return {"model": model, "metrics": metrics, "total": total, "epochs": [line["seconds"] for line in history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="linear")
    parser.add_argument("--backbone", default="dinov2-small")
    parser.add_argument("--data", default="eurosat")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    backbone = vptune.load_backbone(args.backbone)
    base = TrainConfig(
        epochs=args.epochs,
        warmup_epochs=1,
        batch_size=args.batch_size,
        val_split=None,
        test_split=None,
        progress=False,
    )
    task = vptune.data.open_task(args.data)
    splits = load_splits(task, base, args.image_size)
    results = {}
    for cache in ("off", "auto"):
        config = TrainConfig(**{**vptune.config.to_dict(base), "cache": cache})
        results[cache] = run(args.method, backbone, splits, len(task.classes), args.image_size, config)
    plain, cached = results["off"], results["auto"]
    per_epoch = (sum(plain["epochs"]) / len(plain["epochs"]), sum(cached["epochs"]) / len(cached["epochs"]))
    build_seconds = cached["total"] - sum(cached["epochs"])
    gap = max(
        (a - b).abs().max().item()
        for a, b in zip(
            plain["model"].trainable_state_dict().values(),
            cached["model"].trainable_state_dict().values(),
            strict=True,
        )
    )
    summary = {
        "method": args.method,
        "data": task.name,
        "train_images": len(splits.train),
        "image_size": args.image_size,
        "epochs": args.epochs,
        "threads": torch.get_num_threads(),
        "uncached_seconds_per_epoch": round(per_epoch[0], 3),
        "cached_seconds_per_epoch": round(per_epoch[1], 4),
        "cache_build_seconds": round(build_seconds, 2),
        "per_epoch_speedup": round(per_epoch[0] / per_epoch[1], 1),
        "end_to_end_speedup": round(plain["total"] / cached["total"], 2),
        "max_abs_difference_of_trained_tensors": gap,
        "cached_from": cached["metrics"]["cached_from"],
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
