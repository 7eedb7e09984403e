"""K configurations trained in one pass versus one after another, side by side in one run.

    python benchmarks/batched_sweep.py --k 8 --data eurosat --image-size 56 --epochs 1

The K configurations are K base learning rates of VPT-Deep (10 prompt tokens, dropout 0) on train800; both ways use
the same data already in memory, the same schedule and the same seeds, and the script reports how far apart their
trained tensors end up.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import vptune
from vptune.batched import fit_batched
from vptune.data import open_task
from vptune.engine import TrainConfig, load_splits

LRS = (0.4, 0.3, 0.2, 0.15, 0.1, 0.075, 0.05, 0.025, 0.01, 0.005, 0.0025, 0.001)


def tensor_gap(one: vptune.TaskModel, other: vptune.TaskModel) -> float:
    """Largest absolute difference between two models' trained tensors."""
    pairs = zip(one.trainable_state_dict().values(), other.trainable_state_dict().values(), strict=True)
    return max((a - b).abs().max().item() for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--backbone", default="dinov2-small")
    parser.add_argument("--data", default="eurosat")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-tokens", type=int, default=10)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    backbone, task = vptune.load_backbone(args.backbone), open_task(args.data)
    prompt = vptune.PromptConfig(num_tokens=args.num_tokens, dropout=0.0)
    configs = [
        TrainConfig(epochs=args.epochs, warmup_epochs=0, batch_size=args.batch_size, base_lr=lr, val_split=None,
                    test_split=None, progress=False)
        for lr in LRS[: args.k]
    ]  # fmt: skip
    splits = load_splits(task, configs[0], args.image_size)

    def models() -> list[vptune.TaskModel]:
        return [vptune.build("vpt-deep", backbone, task.num_classes, prompt, args.image_size) for _ in configs]

    together, alone = models(), models()
    start = time.perf_counter()
    batched_metrics = fit_batched(together, splits, configs)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    alone_metrics = [vptune.fit(model, splits, config) for model, config in zip(alone, configs, strict=True)]
    sequential = time.perf_counter() - start
    gaps = [tensor_gap(m, n) for m, n in zip(together, alone, strict=True)]
    result = {
        "k": args.k,
        "data": task.name,
        "train_images": len(splits.train),
        "image_size": args.image_size,
        "epochs": args.epochs,
        "threads": torch.get_num_threads(),
        "batched_seconds": round(batched, 1),
        "sequential_seconds": round(sequential, 1),
        "sequential_over_batched": round(sequential / batched, 3),
        "max_abs_difference_of_trained_tensors": max(gaps),
        "per_config": [
            {"base_lr": c.base_lr, "max_abs_difference": gap, "batched_train_loss": round(b["train_loss"], 5),
             "separate_train_loss": round(a["train_loss"], 5)}
            for c, gap, b, a in zip(configs, gaps, batched_metrics, alone_metrics, strict=True)
        ],
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
