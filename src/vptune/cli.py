"""The ``vptune`` command line: train, eval, predict, inspect, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

from .config import read_config_file, to_dict
from .engine import TrainConfig
from .methods import MethodOptions, get_method, method_names
from .prompts import PromptConfig

SECTIONS = {"prompt": PromptConfig, "train": TrainConfig, "options": MethodOptions}
RUN_KEYS = ("data", "method", "backbone", "image_size", "out")
RESOLVED = "config.json"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vptune`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as error:
        print(f"vptune {args.command}: error: {error}", file=sys.stderr)
        return 1


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def _parser() -> argparse.ArgumentParser:
    from . import __version__, commands

    parser = argparse.ArgumentParser(prog="vptune", description="Visual Prompt Tuning on a frozen backbone.")
    parser.add_argument("--version", action="version", version=f"vptune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train one task", description=commands.train.__doc__)
    _add_run_options(train)
    train.set_defaults(run=commands.train)
    evaluate = sub.add_parser("eval", help="score a trained task on a split", description=commands.evaluate.__doc__)
    evaluate.add_argument("run_dir", metavar="RUN", help="a task folder written by train")
    evaluate.add_argument("--split", default="test", help="train, val, trainval or test (default: test)")
    evaluate.add_argument("--data", help="task name or folder (default: the one it was trained on)")
    _add_load_options(evaluate)
    evaluate.set_defaults(run=commands.evaluate)
    predict = sub.add_parser(
        "predict", help="classify images with a trained task", description=commands.predict.__doc__
    )
    predict.add_argument("run_dir", metavar="RUN", help="a task folder written by train")
    predict.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    predict.add_argument("--top-k", type=int, default=5, help="classes to show per image (default: 5)")
    _add_load_options(predict)
    predict.set_defaults(run=commands.predict)
    inspect = sub.add_parser("inspect", help="what a task folder holds", description=commands.inspect.__doc__)
    inspect.add_argument("run_dir", metavar="RUN", help="a task folder written by train")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(run=commands.inspect)
    demo = sub.add_parser(
        "demo", help="train several methods on one task and print one table", description=commands.demo.__doc__
    )
    demo.add_argument("--data", default="eurosat", help="task name or folder (default: eurosat)")
    demo.add_argument("--backbone", default="dinov2-small", help="backbone spec (default: dinov2-small)")
    demo.add_argument("--image-size", type=int, default=112, help="input side (default: 112)")
    demo.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    demo.add_argument(
        "--methods", help="comma-separated methods (default: linear,vpt-shallow,vpt-deep); any registered name works"
    )
    demo.add_argument("--out", default="runs/demo", help="folder for the three task folders (default: runs/demo)")
    demo.add_argument("--json", action="store_true", help="also print the table as JSON")
    demo.set_defaults(run=commands.demo)
    sweep = sub.add_parser(
        "sweep", help="the paper's protocol for one task and method", description=commands.sweep.__doc__
    )
    sweep.add_argument("--data", required=True, help="task name under $VPTUNE_DATA or a task folder")
    sweep.add_argument("--method", required=True, type=_method, help="tuning method")
    sweep.add_argument("--lr", type=_float_list, help="base lrs to try, e.g. 0.5,0.1 (default: the budget's grid)")
    sweep.add_argument("--wd", type=_float_list, help="weight decays to try (default: the budget's grid)")
    sweep.add_argument("--num-tokens", type=_int_list, help="prompt lengths to try, e.g. 1,10,50 (prompted methods)")
    _add_protocol_options(sweep)
    sweep.set_defaults(run=commands.sweep)
    bench = sub.add_parser("bench", help="tasks x methods: sweeps, table, figures", description=commands.bench.__doc__)
    bench.add_argument("--tasks", help="comma-separated tasks (default: the 9-task offline suite)")
    bench.add_argument("--methods", help="comma-separated methods (default: the paper's ten)")
    _add_protocol_options(bench)
    bench.set_defaults(run=commands.bench)
    serve = sub.add_parser(
        "serve", help="serve many tasks over one backbone (HTTP)", description=commands.serve.__doc__
    )
    serve.add_argument("runs", metavar="RUN", nargs="+", help="task folders, or folders holding task folders")
    serve.add_argument("--backbone", help="backbone spec (default: the one the first task records)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--max-batch", type=int, default=32, help="most images per batch (default: 32)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a batch (default: 5)")
    serve.add_argument("--top-k", type=int, default=5, help="classes per answer unless the request says (default: 5)")
    serve.set_defaults(run=commands.serve)
    return parser


def _add_protocol_options(parser: argparse.ArgumentParser) -> None:
    from .sweep import BUDGETS

    budgets = "; ".join(f"{name}: {budget.note}" for name, budget in BUDGETS.items())
    parser.add_argument("--budget", default="smoke", choices=list(BUDGETS), help=f"compute preset ({budgets})")
    parser.add_argument("--seeds", type=int, help="seeds of the final retraining (default: the budget's)")
    parser.add_argument("--backbone", default="dinov2-small", help="backbone spec (default: dinov2-small)")
    parser.add_argument("--backend", default="local", choices=("local", "ray"), help="where runs execute")
    parser.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument(
        "--batched", type=int, default=1, metavar="K", help="train K grid settings of one prompt length in one pass"
    )
    parser.add_argument("--out", required=True, help="output folder; rerunning the same command resumes it")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", help="backbone spec to use instead of the recorded one")
    parser.add_argument("--allow-other-backbone", action="store_true", help="load even if the fingerprint differs")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a JSON or YAML file of options; flags given here override it")
    run = parser.add_argument_group("run")
    run.add_argument("--data", help="task name under $VPTUNE_DATA (default ../shared/data) or a task folder")
    run.add_argument(
        "--method", type=_method, metavar="METHOD", help=f"{', '.join(method_names())} (default: vpt-deep)"
    )
    run.add_argument("--backbone", help="backbone spec: dinov2-small, hf:<hub id>, hf:<folder> (default: dinov2-small)")
    run.add_argument("--image-size", type=int, help="square input side (default: the backbone's native size)")
    run.add_argument("--out", help="run folder (default: runs/<data>-<method>)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for field in dataclasses.fields(cls):
            _add_field(group, section, field)


def _add_field(group, section: str, field: dataclasses.Field) -> None:
    flag = "--" + field.name.replace("_", "-")
    kind, optional = _field_type(field)
    meta = field.metadata
    common = {"dest": f"{section}.{field.name}", "default": argparse.SUPPRESS, "help": meta.get("help", "")}
    if kind is not bool:
        common["metavar"] = "I,J,..." if kind is list else field.name.upper()
    common["help"] += f" (default: {field.default})"
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif kind is list:
        group.add_argument(flag, type=_int_list, **common)
    else:
        parse = _none_or(kind) if optional else kind
        choices = list(meta["choices"]) + ([None] if optional else []) if "choices" in meta else None
        if choices:
            common["metavar"] = "{" + ",".join(str(c).lower() for c in choices) + "}"
        group.add_argument(flag, type=parse, choices=choices, **common)


def _field_type(field: dataclasses.Field) -> tuple[type, bool]:
    hint = typing.get_type_hints(_owner(field))[field.name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    return (typing.get_origin(base) or base), optional


def _owner(field: dataclasses.Field) -> type:
    return next(cls for cls in SECTIONS.values() if field in dataclasses.fields(cls))


def _method(name: str) -> str:
    try:
        get_method(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return name


def _none_or(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    return parse


def _float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def _int_list(text: str) -> list[int]:
    """``"0,1,2"``, ``"first:3"`` (= 0,1,2) or ``"last:3"`` (= -3,-2,-1)."""
    head, _, count = text.partition(":")
    try:
        if head in ("first", "last"):
            return list(range(int(count))) if head == "first" else list(range(-int(count), 0))
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def resolve_run_config(args: argparse.Namespace) -> dict:
    """Defaults < ``--config`` file < flags: the resolved run configuration, as written to ``config.json``."""
    from .methods import prompt_defaults

    given = vars(args)
    file = read_config_file(args.config) if given.get("config") else {}
    resolved = {"data": None, "method": "vpt-deep", "backbone": "dinov2-small", "image_size": None, "out": None}
    resolved.update({key: file[key] for key in RUN_KEYS if key in file})
    resolved.update({key: given[key] for key in RUN_KEYS if given.get(key) is not None})
    for section in SECTIONS:
        values = dict(prompt_defaults(resolved["method"])) if section == "prompt" else {}
        values.update(file.get(section, {}))
        values.update({key.split(".", 1)[1]: value for key, value in given.items() if key.startswith(section + ".")})
        resolved[section] = values
    unknown = sorted(set(file) - set(RUN_KEYS) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{args.config}: unknown keys {unknown}; top-level keys are {RUN_KEYS + tuple(SECTIONS)}")
    if not resolved["data"]:
        raise ValueError("no task given: pass --data NAME (e.g. --data eurosat) or set 'data' in --config")
    resolved["out"] = resolved["out"] or f"runs/{Path(str(resolved['data'])).name}-{resolved['method']}"
    return resolved


def write_resolved(resolved: dict, prompt: PromptConfig, train: TrainConfig, options: dict) -> Path:
    """Write the fully resolved configuration into the run folder."""
    out = Path(resolved["out"])
    out.mkdir(parents=True, exist_ok=True)
    full = {**{key: resolved[key] for key in RUN_KEYS}, "prompt": to_dict(prompt), "train": to_dict(train)}
    full["options"] = options
    (out / RESOLVED).write_text(json.dumps(full, indent=2) + "\n")
    return out / RESOLVED


if __name__ == "__main__":
    raise SystemExit(main())
