"""Train a recorded run again with its starting prompts scaled: does a deep prompt's starting norm matter?

    python -m vptune.tools.scaled_start runs/bench/cifar10/vpt-deep/runs/final-lr0.1-wd0.0001-p10-s0.json --scale 0.333

With the ``cls`` read-out, multiplying VPT-Deep's prompts by a positive factor changes nothing the model computes
(tests/test_designs.py), only how far each step turns them: a token of norm r turns by about 1/r radians per step of
a given length. So this trains the same run (same seed, data, schedule) from the same prompt directions at another
norm, and prints its final train and test accuracy; ``--scale 1`` trains the recorded run again. ``--norm R``
instead sets every starting token's norm to R (token-initialised prompts at Xavier's norm: ``--norm 0.89`` at
width 384).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..loop import fit
from .prompt_motion import read_spec, starting_model


def rescale(prompts: torch.Tensor, scale: float | None = None, norm: float | None = None) -> None:
    """In place: every token (last dimension) times ``scale``, or set to norm ``norm``, its direction kept."""
    if (scale is None) == (norm is None):
        raise ValueError("give one of --scale and --norm")
    name, value = ("scale", scale) if norm is None else ("norm", norm)
    if not value > 0:
        raise ValueError(f"--{name} must be positive, got {value}")
    with torch.no_grad():
        prompts.mul_(scale if norm is None else norm / prompts.norm(dim=-1, keepdim=True))


def train_scaled(path: Path, scale: float | None = None, norm: float | None = None) -> dict:
    """The final metrics of the run recorded at ``path`` trained again from its prompts rescaled (:func:`rescale`)."""
    spec = read_spec(path)
    model, task = starting_model(spec)
    rescale(model.prompts.embeddings, scale, norm)
    return fit(model, task, spec.train.for_method(model.method))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (config.json) or a sweep's runs/<id>.json")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--scale", type=float, help="multiply the starting prompts by this")
    which.add_argument("--norm", type=float, help="set every starting prompt token's norm to this")
    args = parser.parse_args()
    metrics = train_scaled(args.run, args.scale, args.norm)
    print(json.dumps({key: metrics[key] for key in ("train_accuracy", "test_accuracy") if key in metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
