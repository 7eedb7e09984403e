"""How far each block's prompts moved in training: a run folder's trained prompts against the ones it started from.

    python -m vptune.tools.prompt_motion runs/bench/cifar10/vpt-deep+tokens/tasks/final-lr0.1-wd0.0001-p10-s0 [...]

The starting prompts are rebuilt from the run's own config.json (its seed; for init "tokens" the draw from its train
split), so nothing but the finished run folder is needed. Per prompted block: the median token norm at the start and
at the end, and the median cosine between a token's start and end. With the ``cls`` read-out VPT-Deep's prompts
reach the model only through their block's first norm (they enter as keys and values and are replaced after the
block), so a token's scale does not change what the model computes (tests/test_designs.py), only how far one step
turns it: a step of a given length turns a token of norm r by about 1/r radians.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..backbones import load_backbone
from ..data import TaskData, open_task
from ..engine import load_splits
from ..methods import build
from ..model import TaskModel
from ..prototypes import init_from_tokens
from ..runs import RunSpec
from ..taskfile import load_task


def read_spec(path: Path) -> RunSpec:
    """The run spec of a run folder (its config.json) or of a sweep's ``runs/<id>.json`` (its ``resolved`` spec)."""
    path = path / "config.json" if path.is_dir() else path
    data = json.loads(path.read_text())
    return RunSpec.from_dict(data.get("resolved", data), where=str(path))


def starting_model(spec: RunSpec) -> tuple[TaskModel, TaskData]:
    """The model ``spec`` starts training from (token prompts drawn, as training would draw them), and its task."""
    task = open_task(spec.data)
    backbone = load_backbone(spec.backbone)
    model = build(spec.method, backbone, task.num_classes, spec.prompt, spec.image_size, spec.train.seed,
                         classes=task.classes, protocol=task.protocol, head_init=spec.head_init,
                         head_norm=spec.head_norm, **spec.options)  # fmt: skip
    if model.prompts.tokens_pending:
        splits = load_splits(task, spec.train.for_method(model.method), model.preprocessing)
        init_from_tokens(model, splits.train, seed=spec.train.seed)
    return model, task


def starting_prompts(folder: Path) -> torch.Tensor:
    """The (S, p, d) prompts the run in ``folder`` started from."""
    model, _ = starting_model(read_spec(folder))
    return model.prompts.embeddings.detach()[0]


def motion(folder: Path) -> list[dict]:
    start = starting_prompts(folder)
    end = load_task(folder).prompts.embeddings.detach()[0]
    rows = []
    for block, (a, b) in enumerate(zip(start, end, strict=True)):
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        rows.append({"block": block, "norm_start": a.norm(dim=-1).median().item(),
                     "norm_end": b.norm(dim=-1).median().item(), "cosine": cosine.median().item()})  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finished run folders (config.json + task file)")
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args()
    out = {}
    for folder in args.folders:
        rows = out[str(folder)] = motion(folder)
        print(f"{folder}\n| block | median norm, start | median norm, end | median cosine start-end |")
        print("|---|---|---|---|")
        for row in rows:
            print(f"| {row['block']} | {row['norm_start']:.2f} | {row['norm_end']:.2f} | {row['cosine']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
