"""Put back, one at a time, bugs the suite once missed, and check that some test fails on each (not collected by
pytest: run ``python tests/mutation_check.py``; it restores every file, and prints one line per bug).

Each entry: the file, the text to replace, the bug put in its place, the test files that must catch it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "vptune"

BUGS = {
    "fingerprint hashes the first tensor only": (
        "backbones/base.py",
        "for name, tensor in sorted(self.model.state_dict().items()):",
        "for name, tensor in sorted(self.model.state_dict().items())[:1]:",
        ["tests/test_backbones.py"],
    ),
    "default SGD base lr 0.2": (
        "methods/registry.py", "    base_lr: float = 0.1\n", "    base_lr: float = 0.2\n", ["tests/test_defaults.py"]
    ),
    "default momentum 0": (
        "engine.py", 'momentum: float = option(0.9, "SGD momentum")', 'momentum: float = option(0.0, "SGD momentum")',
        ["tests/test_defaults.py"],
    ),
    "--layers last:k off by one": (
        "cli.py", "list(range(-int(count), 0))", "list(range(-int(count) - 1, -1))", ["tests/test_cli.py"]
    ),
    "vptune serve drops --max-batch": (
        "commands.py", "for field in dataclasses.fields(ServeConfig)})",
        'for field in dataclasses.fields(ServeConfig) if field.name != "max_batch"})', ["tests/test_cli.py"],
    ),
    "the batcher ignores max_batch": (
        "serve.py", "while len(batch) < self.config.max_batch:", "while len(batch) < 10**9:", ["tests/test_serve.py"]
    ),
    "evaluate leaves the model where it is": (
        "engine.py", "    model.to(device)\n    return _evaluate(", "    return _evaluate(", ["tests/test_multitask.py"]
    ),
    # the four of "One way in" (issue 31): each passed the whole suite of commit 6b76526
    "fingerprint hashes parameters, not buffers": (
        "backbones/base.py",
        "for name, tensor in sorted(self.model.state_dict().items()):",
        "for name, tensor in sorted(self.model.named_parameters()):",
        ["tests/test_families.py", "tests/test_convnets.py"],
    ),
    "no check of the trained tensors after the update": (
        "loop.py", "for k in [k for k in trainee.live if k in where and not math.isfinite(",
        "for k in [k for k in trainee.live if False and not math.isfinite(", ["tests/test_engine.py"],
    ),
    "a ConvNet border not normalised": (
        "prompts/pixels.py", "    return (values - mean_t) / std_t\n", "    return values\n", ["tests/test_convnets.py"]
    ),
    "load_task ignores the task file's mean and std": (
        "taskfile.py",
        'preprocessing=Preprocessing.from_record(record["preprocessing"]),',
        'preprocessing=Preprocessing(record["preprocessing"]["image_size"], backbone.mean, backbone.std, '
        'record["preprocessing"].get("protocol", "vtab")),',
        ["tests/test_taskfile.py"],
    ),
    "every sample of a batch gets the first head row of its class count": (
        "multitask.py",
        "self.heads[key].module(features[index], slots)",
        "self.heads[key].module(features[index], torch.zeros_like(slots))",
        ["tests/test_lazy.py"],
    ),
    "a task row written anew keeps the old task's prompt keys and values": (
        "multitask.py", "            self.cache.forget(row)\n", "            pass\n", ["tests/test_lazy.py"]
    ),
    "a task folder changed on disk is not read again": (
        "multitask.py", "if _stamp(self._folder(name)) != entry.stamp:", "if False:", ["tests/test_lazy.py"]
    ),
    "a damaged task fails the other requests of its batch": (
        "serve.py",
        "            served.info(name)\n        except TaskNotFound:",
        "            pass\n        except TaskNotFound:",
        ["tests/test_lazy.py"],
    ),
}  # fmt: skip


def caught(file: str, old: str, new: str, tests: list[str]) -> bool:
    path = SRC / file
    original = path.read_text()
    if original.count(old) != 1:
        raise SystemExit(f"{file}: the text to mutate is not there exactly once: {old!r}")
    path.write_text(original.replace(old, new))
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not real",
                              *tests], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    finally:
        path.write_text(original)
    return run.returncode == 1


def main() -> int:
    missed = 0
    for name, bug in BUGS.items():
        found = caught(*bug)
        missed += not found
        print(f"{'caught' if found else 'MISSED'}: {name}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
