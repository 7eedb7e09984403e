"""Train a recorded run again with its starting prompts scaled: does a deep prompt's starting norm matter?

    python benchmarks/scaled_start.py runs/bench/cifar10/vpt-deep/runs/final-lr0.1-wd0.0001-p10-s0.json --scale 0.333

With the ``cls`` read-out, multiplying VPT-Deep's prompts by a positive factor changes nothing the model computes
(tests/test_designs.py), only how far each step turns them: a token of norm r turns by about 1/r radians per step of
a given length. So this trains the same run (same seed, data, schedule) from the same prompt directions at another
norm, and prints its final train and test accuracy; ``--scale 1`` trains the recorded run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from prompt_motion import read_spec, starting_model

import vptune


def train_scaled(path: Path, scale: float) -> dict:
    """The final metrics of the run recorded at ``path`` trained again from its prompts times ``scale``."""
    if not scale > 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    spec = read_spec(path)
    model, task = starting_model(spec)
    with torch.no_grad():
        model.prompts.embeddings.mul_(scale)
    return vptune.fit(model, task, spec.train.for_method(model.method))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (config.json) or a sweep's runs/<id>.json")
    parser.add_argument("--scale", type=float, required=True, help="multiply the starting prompts by this")
    args = parser.parse_args()
    metrics = train_scaled(args.run, args.scale)
    print(json.dumps({key: metrics[key] for key in ("train_accuracy", "test_accuracy") if key in metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
