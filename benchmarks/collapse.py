"""Watch a training run step by step: loss, the head's logit scale, each trained tensor's gradient norm and lr.

    python benchmarks/collapse.py --data cifar10 --method vpt-deep --base-lr 0.1 --out runs/collapse.json

What issue 16 asked for to find why some runs collapse: one JSON line per step, and the epoch summaries.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import vptune
from vptune import TrainConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="task name or folder")
    parser.add_argument("--method", default="vpt-deep", help="tuning method")
    parser.add_argument("--backbone", default="dinov2-small", help="backbone spec")
    parser.add_argument("--image-size", type=int, default=56, help="input side")
    parser.add_argument("--base-lr", type=float, default=0.1, help="base lr")
    parser.add_argument("--epochs", type=int, default=8, help="epochs")
    parser.add_argument("--warmup-epochs", type=float, default=1, help="warmup epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--train-split", default="trainval", help="train or trainval")
    parser.add_argument("--prompt", default="{}", help="prompt options as JSON, e.g. '{\"num_tokens\": 10}'")
    parser.add_argument("--out", help="write the step lines here (JSON lines)")
    parser.add_argument("--variant", default="", help="what to try besides: clip1 (gradient norm clipped at 1)")
    parser.add_argument("--head-init", default="uniform", help="uniform or released")
    parser.add_argument("--head-norm", default="batchnorm", help="batchnorm or none")
    args = parser.parse_args()

    method = vptune.METHODS[args.method]
    prompt = method.prompt_config(**json.loads(args.prompt)) if method.prompted else None
    task = vptune.open_task(args.data)
    backbone = vptune.load_backbone(args.backbone)
    model = vptune.build(args.method, backbone, classes=task.classes, prompt=prompt, image_size=args.image_size,
                         seed=args.seed, protocol=task.protocol, head_init=args.head_init,
                         head_norm=args.head_norm)  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    steps: list[dict] = []

    def logits_hook(module, inputs, output) -> None:
        if module.training:
            steps.append({"logit_std": output.float().std().item(), "logit_absmax": output.float().abs().max().item()})

    def grads(optimizer, *_) -> None:
        if "clip1" in args.variant:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        line = steps[-1]
        line["lr"] = optimizer.param_groups[0]["lr"]
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    line[f"grad/{names[id(param)]}"] = param.grad.norm().item()
                    line[f"norm/{names[id(param)]}"] = param.detach().norm().item()

    model.head.register_forward_hook(logits_hook)
    handle = register_optimizer_step_pre_hook(grads)
    config = TrainConfig(epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
                         base_lr=args.base_lr, weight_decay=args.weight_decay, seed=args.seed, cache="off",
                         train_split=args.train_split, val_split=None, test_split="test", progress=False)  # fmt: skip
    epochs = []
    try:
        metrics = vptune.fit(model, task, config, on_epoch_end=lambda m: epochs.append(dict(m)))
    except vptune.TrainingDiverged as error:
        metrics = {"diverged": str(error)}
    finally:
        handle.remove()
    print(json.dumps({"epochs": epochs, "final": metrics}, indent=1))
    if args.out:
        with open(args.out, "w") as file:
            for line in steps:
                file.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())
