"""Per-task files: ``vptune.json`` (everything needed to rebuild) plus ``weights.safetensors`` (what trained)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._version import __version__
from .backbones import Backbone, load_backbone
from .config import from_dict, to_dict
from .data import TaskData
from .files import write_atomic, write_json
from .head import HEAD_INIT
from .hub import hub_folder, is_hub, model_card, upload
from .methods import build, get_method
from .model import TaskModel
from .preprocessing import Preprocessing
from .prompts import PromptConfig
from .taskcheck import TaskFileError, check_record, check_weights

RECORD = "vptune.json"
WEIGHTS = "weights.safetensors"
FORMAT = 1


def save_task(
    model: TaskModel,
    path: str | os.PathLike,
    classes: list[str] | None = None,
    *,
    train_config: dict | None = None,
    metrics: dict | None = None,
    data: TaskData | None = None,
    status: str = "complete",
) -> Path:
    """Write a task folder: ``vptune.json`` and ``weights.safetensors`` holding only what training changed (the trained
    tensors, and an MLP head's batch-norm statistics).

    Both files are written to temporary names and renamed, so an interrupted save leaves the old files whole.

    Args:
        model: a model from :func:`vptune.build` (trained or not).
        path: the folder (created if needed).
        classes: class names, index = label; default ``model.classes``.
        train_config: the training configuration to record (as a dict).
        metrics: final metrics to record (e.g. ``{"val_accuracy": ..., "test_accuracy": ...}``).
        data: the task it was trained on (its name, folder, layout, split sources and carving are recorded).
        status: ``"complete"``, or what a partial run's weights are (e.g. ``"partial: epoch 3 of 10"``).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    classes = list(classes or model.classes)
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names given for a model with {model.num_classes} classes")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.task_state_dict().items()}
    broken = [name for name, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        raise TaskFileError(f"not saved: {', '.join(broken)} hold NaN or infinite values (training diverged)")
    backbone = model.backbone.record()
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=_metadata(model, backbone)))
    record = {
        "format": FORMAT,
        "library": {"name": "vptune", "version": __version__},
        "method": model.method,
        "options": model.options,
        "prompt": to_dict(model.prompt_config),
        "num_classes": model.num_classes,
        "classes": classes,
        "head": _head_record(model),
        "preprocessing": model.preprocessing.to_record(),
        "data": data.record() if data else None,
        "backbone": backbone,
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "trainable_parameters": model.num_trainable(),
        "train_config": train_config,
        "metrics": metrics or {},
        "status": status,
    }
    write_json(folder / RECORD, record)
    return folder


def _head_record(model: TaskModel) -> dict:
    hidden = getattr(model.head, "hidden", [])
    kind = "mlp" if hidden else "linear"
    return {
        "type": kind,
        "init": model.head_init,
        "norm": model.head_norm,
        "layers": len(hidden) + 1,
        "in_features": model.backbone.width,
        "out_features": model.num_classes,
    }


def _metadata(model: TaskModel, backbone: dict) -> dict[str, str]:
    return {"method": model.method, "backbone_spec": backbone["spec"], "backbone_fingerprint": backbone["fingerprint"]}


def mark_partial(path: str | os.PathLike, reason: str) -> None:
    """Say in a task folder's record that its run did not finish, and why (its weights: its last finished epoch)."""
    file = Path(path) / RECORD
    record = json.loads(file.read_text())
    record["status"] = f"{record.get('status', 'partial')}; {reason}"
    write_json(file, record)


def _local(path: str | os.PathLike) -> str | os.PathLike:
    """A task folder on disk: ``path`` itself, or a Hub task's (``hf://...``) copy in the Hugging Face cache."""
    if is_hub(path):
        return hub_folder(path, (RECORD, WEIGHTS))
    return path


def read_record(path: str | os.PathLike) -> dict:
    """The ``vptune.json`` of a task folder (or ``hf://...``), with a clear error when it is missing or unreadable."""
    path = _local(path)
    file = Path(path) / RECORD
    if not file.is_file():
        raise TaskFileError(f"{path} is not a task folder: {RECORD} is missing (save one with vptune.save_task)")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise TaskFileError(f"{file} is not valid JSON ({error}); the task folder is damaged") from error
    if isinstance(record, dict) and isinstance(record.get("format"), int) and record["format"] > FORMAT:
        raise TaskFileError(f"{file} has format {record['format']}; this vptune reads up to {FORMAT}: upgrade vptune")
    return check_record(record, file)


def load_task(
    path: str | os.PathLike,
    backbone: Backbone | None = None,
    allow_other_backbone: bool = False,
    device: str | torch.device = "cpu",
) -> TaskModel:
    """Rebuild a saved task model in eval mode.

    Args:
        path: a folder written by :func:`save_task`, or ``hf://<repo>[/<subfolder>][@<revision>]`` on the Hub.
        backbone: the frozen backbone to attach; default: loaded from the recorded spec.
        allow_other_backbone: load even when the backbone's fingerprint differs from the recorded one.
        device: where the loaded model lives.
    """
    path = _local(path)
    record, folder = check_task(path), Path(path)
    if record.get("status", "complete") != "complete":
        warnings.warn(f"{folder} holds a run that did not finish ({record['status']})", stacklevel=2)
    backbone = backbone or load_backbone(record["backbone"]["spec"])
    _check_backbone(record["backbone"], backbone, allow_other_backbone, path)
    try:
        model = _build(record, backbone, folder / RECORD)
    except TaskFileError:
        raise
    except ValueError as error:  # a value the record holds that no model takes
        raise TaskFileError(f"{folder / RECORD}: {error}") from error
    model.load_state_dict(_read_tensors(folder, model), strict=False)
    return model.to(device).eval()


def check_task(path: str | os.PathLike) -> dict:
    """A task folder's record, after checking every field, the prompt configuration and method options it holds,
    and the weights file against it (without building anything): a :class:`TaskFileError` naming what is wrong."""
    path = _local(path)
    record, folder = read_record(path), Path(path)
    if not (folder / WEIGHTS).is_file():
        raise TaskFileError(f"{folder / WEIGHTS} is missing: the task folder is incomplete")
    check_weights(record, folder / WEIGHTS)  # before anything the record declares is allocated
    try:
        from_dict(PromptConfig, record["prompt"], where=str(folder / RECORD))
        get_method(record["method"])[0].make_options(record.get("options"))
        Preprocessing.from_record(record["preprocessing"])
    except ValueError as error:
        raise TaskFileError(f"{folder / RECORD}: {error}") from error
    return record


def _build(record: dict, backbone: Backbone, file: Path) -> TaskModel:
    head = record.get("head") if isinstance(record.get("head"), dict) else {}
    return build(
        record["method"],
        backbone,
        record["num_classes"],
        prompt=from_dict(PromptConfig, record["prompt"], where=str(file)),
        classes=record["classes"],
        preprocessing=Preprocessing.from_record(record["preprocessing"]),
        head_init=head.get("init", HEAD_INIT),
        head_norm=head.get("norm", "none"),  # task files from before it existed had none
        **record.get("options", {}),
    )


def _check_backbone(recorded: dict, backbone: Backbone, allow: bool, path) -> None:
    ours = backbone.fingerprint()
    if recorded["fingerprint"] == ours or allow:
        return
    raise TaskFileError(
        f"task {path} was trained on backbone {recorded['spec']!r} (fingerprint {recorded['fingerprint']}), "
        f"but this backbone is {backbone.spec!r} (fingerprint {ours}): pass the backbone it was trained on "
        f"(--backbone {recorded['spec']}), or allow_other_backbone=True / --allow-other-backbone to override"
    )


def _read_tensors(folder: Path, model: TaskModel) -> dict[str, torch.Tensor]:
    file = folder / WEIGHTS
    expected = model.task_state_dict()
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise TaskFileError(f"{file} cannot be read as safetensors ({error}); the task folder is damaged") from error
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise TaskFileError(
            f"{file} does not match method {model.method!r}: missing {missing}, unexpected {unexpected}"
        )
    for name, tensor in tensors.items():
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise TaskFileError(f"{file}: tensor {name} has shape {tuple(tensor.shape)}, the model expects {want}")
        if tensor.is_floating_point() and not tensor.isfinite().all():
            raise TaskFileError(f"{file}: tensor {name} holds NaN or infinite values; the task folder is damaged")
    return tensors


def push_task(
    path: str | os.PathLike,
    repo: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
) -> str:
    """Upload a task folder (its record, weights and a generated model card ``README.md``) to a Hugging Face Hub model
    repository, creating it if needed; returns the commit's URL. The folder is checked first: a damaged one is not
    uploaded."""
    record, folder = check_task(path), Path(path)
    return upload(
        [folder / RECORD, folder / WEIGHTS], model_card(record, repo), repo, token=token, private=private,
        revision=revision, message=message or f"vptune task {folder.name}",
    )  # fmt: skip
