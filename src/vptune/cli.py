"""The ``vptune`` command line: parsing only; what each command does is in :mod:`vptune.commands`.

One vocabulary across commands: ``--data``, ``--method(s)``, ``--backbone``, ``--image-size``, ``--batch-size``,
``--base-lr``, ``--weight-decay``, ``--epochs``, ``--out``. Every option of a run (``vptune train``) is a flag named
after its config field; ``--config FILE`` reads the same options from JSON or YAML, flags winning.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing

from . import commands
from ._version import __version__
from .engine import TrainConfig
from .head import HEAD_INITS, HEAD_NORMS
from .methods import ALIASES, METHODS, get_method, method_names
from .prompts import PromptConfig
from .serve import ServeConfig
from .sweep import BACKENDS, BUDGETS

ERRORS = (ValueError, OSError, ImportError, RuntimeError, KeyError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vptune`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_transformers()
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"vptune {args.command}: error: {message}", file=sys.stderr)
        return 1


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    """The whole ``vptune`` parser (one sub-parser per command)."""
    parser = argparse.ArgumentParser(prog="vptune", description="Visual Prompt Tuning on a frozen backbone.")
    parser.add_argument("--version", action="version", version=f"vptune {__version__}", help="print the version")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add, command, summary) in COMMANDS.items():
        child = sub.add_parser(name, help=summary, description=command.__doc__)
        add(child)
        child.set_defaults(run=command)
    return parser


# --- vptune train ---------------------------------------------------------------------------------
def _train(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(layer=None)
    parser.add_argument("--config", help="a JSON or YAML file of run options (e.g. a run's config.json); flags win")
    parser.add_argument("--out", help="run folder (default: runs/<data>-<method>)")
    run = parser.add_argument_group("run")
    run.add_argument("--data", action=_Into, help="task name under $VPTUNE_DATA (default ../shared/data) or folder")
    run.add_argument("--method", action=_Into, type=_method, help=_method_help())
    run.add_argument("--backbone", action=_Into, help="dinov2-small, hf:<hub id>, hf:<folder> (default: dinov2-small)")
    run.add_argument("--image-size", action=_Into, type=int, help="square input side (default: the backbone's)")
    run.add_argument(
        "--head-init", action=_Into, choices=HEAD_INITS,
        help="uniform: nn.Linear's range (default); released: the released code's kaiming fan-out and -log(99) bias",
    )  # fmt: skip
    run.add_argument(
        "--head-norm", action=_Into, choices=HEAD_NORMS,
        help="batchnorm: a batch norm without affine on the features the head reads (default); none: the paper's",
    )  # fmt: skip
    for section, cls in (("prompt", PromptConfig), ("train", TrainConfig)):
        group = parser.add_argument_group(section)
        for field in dataclasses.fields(cls):
            _add_field(group, section, field, cls)
    seen: set[str] = set()
    for method in METHODS.values():
        fields = [f for f in dataclasses.fields(method.options) if f.name not in seen] if method.options else []
        group = parser.add_argument_group(f"{method.name} options") if fields else None
        for field in fields:
            _add_field(group, "options", field, method.options)
            seen.add(field.name)


class _Into(argparse.Action):
    """Puts a flag's value into ``namespace.layer``: in its section (``prompt``, ``train``, ``options``) or at the
    top; what no flag names stays out, so that a config file's value stands."""

    def __init__(self, option_strings, dest, section: str | None = None, **kwargs):
        self.section = section
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _store(namespace, self.section, self.dest, values)


class _IntoSwitch(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag`` into ``namespace.layer`` (see :class:`_Into`)."""

    def __init__(self, option_strings, dest, section: str | None = None, **kwargs):
        self.section = section
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _store(namespace, self.section, self.dest, not option_string.startswith("--no-"))


def _store(namespace: argparse.Namespace, section: str | None, name: str, value) -> None:
    if namespace.layer is None:
        namespace.layer = {}
    target = namespace.layer.setdefault(section, {}) if section else namespace.layer
    target[name] = value


def _method_help() -> str:
    example = next(iter(sorted(ALIASES, key=len, reverse=True)), None)
    recipes = ""
    if example is not None:
        options = ALIASES[example][1]
        flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in options.items())
        recipes = f"; or a named recipe of its prompt options, e.g. {example} (= {ALIASES[example][0]} {flags})"
    return f"{', '.join(method_names())} (default: vpt-deep){recipes}"


# TrainConfig fields whose unset value is a Method's attribute of the same name
METHOD_TRAIN_DEFAULTS = ("base_lr",)


def _default_text(section: str, field: dataclasses.Field) -> str:
    """How --help states a field's default: its value, the methods' where they differ, or what resolves it."""
    by_method = _methods_values(section, field)
    if len(by_method) > 1:
        groups = sorted(by_method.items(), key=lambda item: len(item[1]))
        parts = [f"{value} for {', '.join(names)}" for value, names in groups[:-1]]
        return "the method's: " + "; ".join([*parts, f"{groups[-1][0]} for the others"])
    return field.metadata.get("shown") or str(field.default)


def _methods_values(section: str, field: dataclasses.Field) -> dict:
    """Each default value of ``field`` among the registered methods that set it, with the methods that have it."""
    values: dict = {}
    for method in METHODS.values():
        if section == "prompt" and method.prompted:
            forced = method.deep if field.name == "deep" else None
            value = forced if forced is not None else method.prompt.get(field.name, field.default)
        elif section == "train" and field.name in METHOD_TRAIN_DEFAULTS:
            value = getattr(method, field.name)
        else:
            continue
        values.setdefault(value, []).append(method.name)
    return values


def _add_field(group, section: str, field: dataclasses.Field, owner: type) -> None:
    kind, optional = _field_type(field, owner)
    choices = field.metadata.get("choices")
    common = {"dest": field.name, "section": section, "default": argparse.SUPPRESS}
    common["help"] = f"{field.metadata.get('help', '')} (default: {_default_text(section, field)})"
    flag = "--" + field.name.replace("_", "-")
    if kind is bool:
        group.add_argument(flag, action=_IntoSwitch, **common)
    elif kind is list:
        group.add_argument(flag, action=_Into, type=_int_list, metavar="I,J,...", **common)
    else:
        metavar = "{" + ",".join(map(str, choices)) + (",none" if optional else "") + "}" if choices else None
        parse = _none_or(kind) if optional else kind
        group.add_argument(flag, action=_Into, type=parse, metavar=metavar or field.name.upper(), **common)


def _field_type(field: dataclasses.Field, owner: type) -> tuple[type, bool]:
    hint = typing.get_type_hints(owner)[field.name]
    args = typing.get_args(hint)
    optional = isinstance(hint, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    return (typing.get_origin(base) or base), optional


# --- the other commands ---------------------------------------------------------------------------
def _eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a task folder written by train, or hf://<repo>[/<sub>][@<rev>]")
    parser.add_argument("--split", default="test", help="train, val, trainval or test (default: test)")
    parser.add_argument("--data", help="task name or folder (default: the one it was trained on)")
    _add_load_options(parser)


def _predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a task folder written by train, or hf://<repo>[/<sub>][@<rev>]")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (default: 5)")
    _add_load_options(parser)


def _inspect(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="a task folder written by train, or hf://<repo>[/<sub>][@<rev>]")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _add_load_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", help="backbone spec to use instead of the recorded one")
    parser.add_argument("--allow-other-backbone", action="store_true", help="load even if the fingerprint differs")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="eurosat", help="task name or folder (default: eurosat)")
    parser.add_argument("--backbone", default="dinov2-small", help="backbone spec (default: dinov2-small)")
    parser.add_argument("--image-size", type=int, default=112, help="square input side (default: 112)")
    parser.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    parser.add_argument(
        "--methods", help="comma-separated methods (default: linear,vpt-shallow,vpt-deep); any registered name works"
    )
    parser.add_argument("--out", default="runs/demo", help="folder for the run folders (default: runs/demo)")
    parser.add_argument("--json", action="store_true", help="also print the table as JSON")


def _sweep(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="task name under $VPTUNE_DATA or a task folder")
    parser.add_argument("--method", required=True, type=_method, help="tuning method")
    parser.add_argument(
        "--base-lr", "--lr", dest="base_lr", type=_float_list, help="base lrs to try, e.g. 0.5,0.1 (default: budget's)"
    )
    parser.add_argument(
        "--weight-decay", "--wd", dest="weight_decay", type=_float_list, help="weight decays to try (default: budget's)"
    )
    parser.add_argument("--num-tokens", type=_int_list, help="prompt lengths to try, e.g. 1,10,50 (prompted methods)")
    parser.add_argument(
        "--time-budget",
        metavar="TIME",
        help="plan the sweep to finish within TIME (e.g. 20m, 1h, 90s): this machine's speed is measured on a few "
        "steps, then the input size, lr grid (centred on the method's default), schedule in steps, halving and final "
        "run are chosen to fit, printed with the estimate, and kept to (replaces --budget)",
    )
    parser.add_argument(
        "--image-size", type=int, help="input size (default: the budget's; with --time-budget, chosen to fit)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="measure this machine's speed, print the plan and its estimate, train nothing",
    )
    _add_protocol_options(parser)


def _bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", help="comma-separated tasks (default: the 9-task offline suite)")
    parser.add_argument("--methods", help="comma-separated methods (default: the paper's ten)")
    _add_protocol_options(parser)


def _add_protocol_options(parser: argparse.ArgumentParser) -> None:
    budgets = "; ".join(f"{name}: {budget.note}" for name, budget in BUDGETS.items())
    parser.add_argument("--budget", choices=list(BUDGETS), help=f"compute preset (default: smoke; {budgets})")
    parser.add_argument("--seeds", type=int, help="seeds of the final retraining (default: the budget's)")
    parser.add_argument("--backbone", default="dinov2-small", help="backbone spec (default: dinov2-small)")
    parser.add_argument("--backend", default="local", choices=BACKENDS, help="where runs execute (default: local)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument(
        "--batched", type=int, default=1, metavar="K", help="train K grid settings of one prompt length in one pass"
    )
    parser.add_argument("--out", required=True, help="output folder; rerunning the same command resumes it")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _serve(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "runs",
        metavar="RUN",
        nargs="*",
        help="task folders, folders holding task folders, or hf://<repo>[/<sub>][@<rev>]",
    )
    add("--backbone", help="backbone spec (default: the one the first task records)")
    add("--lazy", action="store_true", help="serve every task folder under --task-root, each loaded on first request")
    add("--max-resident", type=int, metavar="N", help="with --lazy: most tasks kept loaded (default: no bound)")
    add(
        "--backend", choices=("local", "ray"), default="local",
        help="local: one process (default); ray: a Ray Serve application over --task-root, requests routed to a "
        "replica holding their task (header serve_multiplexed_model_id)",
    )  # fmt: skip
    add("--replicas", type=int, default=1, help="with --backend ray: replicas, each holding the backbone (default: 1)")
    add("--ray-address", help="with --backend ray: the Ray cluster to join (default: start a local Ray)")
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    add("--port", type=int, default=8000, help="port (default: 8000)")
    for field in dataclasses.fields(ServeConfig):
        flag, kind = "--" + field.name.replace("_", "-"), _field_type(field, ServeConfig)[0]
        add(flag, type=kind, default=field.default, help=f"{field.metadata['help']} (default: {field.default})")
    parser.set_defaults(admin_token=os.environ.get("VPTUNE_ADMIN_TOKEN"))  # the flag, else the environment


def _export(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("run_dir", metavar="TASK", help="a task folder")
    add("--format", default="onnx", help="what to write: onnx (the only one so far)")
    add("--out", required=True, help="the file to write")
    add("--structure", action="store_true", help="one graph for every task of its prompt structure")
    add("--int8", action="store_true", help="the backbone's matrix products quantised to int8 (prompts and head fp32)")
    _add_load_options(parser)


def _push(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("run_dir", metavar="TASK", help="a task folder")
    add("repo", metavar="REPO", help="the Hub model repository, <user>/<name> (created if needed)")
    add("--private", action="store_true", help="create the repository private")
    add("--revision", help="the branch to commit to (default: main)")
    add("--token", help="a Hub token with write access (default: HF_TOKEN or the stored login)")


def _convert_mocov3(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a MoCo v3 ViT checkpoint (.pth.tar)")
    parser.add_argument("out_folder", metavar="OUT_FOLDER", help="where to write the transformers model folder")
    parser.add_argument(
        "--encoder", default="base", choices=("base", "momentum"), help="which encoder to take (default: base)"
    )
    parser.add_argument(
        "--heads", type=int, help="attention heads (default: MoCo v3's for the width: 12 for ViT-S/B, 16 for L/H)"
    )


# name: (adds its arguments, runs it, one line of help)
COMMANDS = {
    "train": (_train, commands.train, "train one task"),
    "eval": (_eval, commands.evaluate, "score a trained task on a split"),
    "predict": (_predict, commands.predict, "classify images with a trained task"),
    "inspect": (_inspect, commands.inspect, "what a task folder holds"),
    "demo": (_demo, commands.demo, "train several methods on one task and print one table"),
    "sweep": (_sweep, commands.sweep, "the paper's protocol for one task and method"),
    "bench": (_bench, commands.bench, "tasks x methods: sweeps, table, figures"),
    "serve": (_serve, commands.serve, "serve many tasks over one backbone (HTTP)"),
    "export": (_export, commands.export, "a task as an ONNX graph (ONNX Runtime, TensorRT ...)"),
    "push": (_push, commands.push, "upload a task folder to the Hugging Face Hub, with a model card"),
    "convert-mocov3": (_convert_mocov3, commands.convert_mocov3, "a MoCo-v3 ViT checkpoint as an hf: backbone folder"),
}


# --- value parsers --------------------------------------------------------------------------------
def _method(name: str) -> str:
    try:
        get_method(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return name


def _none_or(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
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


if __name__ == "__main__":
    raise SystemExit(main())
