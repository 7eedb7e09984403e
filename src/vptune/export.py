"""Tasks outside PyTorch: ONNX graphs run by ONNX Runtime, and an int8 backbone.

Two kinds of graph, both with a dynamic batch size, opset :data:`OPSET`, made by PyTorch's ONNX exporter
(``torch.onnx.export(dynamo=True)``):

- a **task** graph: one task, its prompts and head baked in; input ``pixel_values`` (B, C, S, S), normalised as its
  task file says; output ``logits`` (B, C).
- a **structure** graph: the backbone once, every prompt tensor and head tensor a per-sample input (B, ...), so one
  graph serves every task of one prompt structure (:func:`structure_key`); the task tensors are gathered outside it
  (:class:`OnnxTasks` does it from task folders), heads of different class counts padded and cut back.

Every graph carries what is needed to use it (the classes, the preprocessing, its inputs) as ONNX metadata
(``vptune``, JSON). ``int8``: ONNX Runtime's dynamic quantisation of the backbone's matrix products (weights int8,
activations quantised per batch); the prompts and the head stay fp32. The accuracy it costs is measured in
docs/export.md, never assumed.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .model import TaskModel
from .multitask import _check_servable, _structure
from .preprocessing import Preprocessing
from .stacking import stackable
from .taskfile import load_task

OPSET = 18
METADATA = "vptune"


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'vptune[export]'") from error
    return onnx, onnxruntime


class _TaskGraph(nn.Module):
    """One task: pixels -> logits."""

    def __init__(self, model: TaskModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


class _StructureGraph(nn.Module):
    """Every task of one prompt structure: pixels and each sample's task tensors -> logits."""

    def __init__(self, model: TaskModel, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, pixel_values: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(pixel_values.shape[0], device=pixel_values.device)
        given = dict(zip(self.names, tensors, strict=True))
        return torch.func.functional_call(self.model, given, (pixel_values, rows), strict=False)


def task_tensor_names(model: TaskModel) -> tuple[str, ...]:
    """The tensors a structure graph takes per sample: each prompt tensor with a task row, then the head's."""
    prompts = tuple(f"prompts.{name}" for name in model.prompts.task_tensors) if model.prompts is not None else ()
    return prompts + tuple(f"head.{name}" for name in model.head.state_dict())


def structure_key(model: TaskModel) -> str:
    """What tasks must share to run in one structure graph: the prompt structure and the head's width and norm."""
    head = model.head
    return json.dumps([_structure(model), head.weight.shape[-1], getattr(head, "norm", None) is not None])


def why_not_exported(model: TaskModel, structure: bool) -> str | None:
    """Why a model cannot be exported as asked, or None."""
    if structure:
        try:
            _check_servable(model, model.backbone, "this task")
        except ValueError as error:
            return f"a structure graph shares one backbone: {error}"
        if not stackable(model):
            return "its prompts keep a module of their own (a projection or an input channel): export it as a task"
    return None  # (a head other than a linear Head is refused by the servable check)


def export_onnx(
    task: TaskModel | str | os.PathLike,
    out: str | os.PathLike,
    *,
    structure: bool = False,
    int8: bool = False,
    batch: int = 2,
) -> Path:
    """Write an ONNX graph of a task (a loaded model or a task folder): a task graph, or with ``structure`` the
    graph of its prompt structure; with ``int8`` the backbone's matrix products quantised. Returns ``out``."""
    onnx, _ = _onnx_modules()
    model = (task if isinstance(task, TaskModel) else load_task(task)).eval()
    reason = why_not_exported(model, structure)
    if reason:
        raise ValueError(f"cannot export {model.method!r} {'as a structure graph' if structure else ''}: {reason}")
    size = model.image_size
    pixels = torch.randn(batch, model.backbone.in_chans, size, size, device=next(model.parameters()).device)
    batch_dim = torch.export.Dim("batch", min=1)
    if structure:
        names = task_tensor_names(model)
        rows = {name: tensor.detach() for name, tensor in model.state_dict().items() if name in names}
        tensors = tuple(rows[name][:1].expand(batch, *rows[name].shape[1:]).contiguous() for name in names)
        graph = _StructureGraph(model, names)
        classes = torch.export.Dim("classes", min=1)
        shapes = ({0: batch_dim}, tuple(_dims(name, batch_dim, classes) for name in names))
        inputs, input_names = (pixels, *tensors), ["pixel_values", *[name.replace(".", "/") for name in names]]
    else:
        graph, shapes, inputs, input_names = _TaskGraph(model), ({0: batch_dim},), (pixels,), ["pixel_values"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
        warnings.simplefilter("ignore")
        fp32 = Path(scratch) / "fp32.onnx" if int8 else out
        torch.onnx.export(
            graph, inputs, fp32, input_names=input_names, output_names=["logits"], dynamic_shapes=shapes,
            dynamo=True, external_data=False, opset_version=OPSET, verbose=False,
        )  # fmt: skip
        if int8:
            _quantise(onnx, fp32, out)
    _write_metadata(onnx, out, model, structure, int8, input_names)
    return out


def check_export(model: TaskModel, path: str | os.PathLike, batch: int = 3, tolerance: float = 1e-4) -> float:
    """The largest difference between the graph's logits (ONNX Runtime) and the model's on a random batch; an fp32
    graph further than ``tolerance`` is removed and refused (an int8 one differs by design: the figure says how
    much)."""
    size = model.image_size
    pixels = torch.randn(batch, model.backbone.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    record = read_metadata(path)
    with torch.no_grad():
        reference = model(pixels).float().numpy()
    if record["kind"] == "task":
        got = OnnxTask(path)(pixels)
    else:
        got = np.stack(OnnxTasks(path, {"task": model})(pixels, ["task"] * batch))
    difference = float(np.abs(got - reference).max())
    if not record["int8"] and not difference <= tolerance:
        Path(path).unlink()
        raise ValueError(
            f"the exported graph's logits differ from PyTorch's by {difference:.3g} (more than {tolerance}): not "
            "written; please report it with the task's method and backbone"
        )
    return difference


def _dims(name: str, batch, classes) -> dict:
    if name in ("head.weight", "head.bias"):
        return {0: batch, 1: classes}
    return {0: batch}


def _quantise(onnx, source: Path, out: Path) -> None:
    """The backbone's matrix products with int8 weights, one scale per output channel (dynamic quantisation:
    activations quantised per batch); the head's product stays fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source)).graph
    constants = {initializer.name for initializer in graph.initializer}
    head = head_product(graph)
    nodes = [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and node.input[1] in constants and node.name != getattr(head, "name", None)
    ]
    # one scale per output channel: on signdigits, per-tensor scales cost 1.41 test points, per-channel none
    quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, nodes_to_quantize=nodes, per_channel=True)


def head_product(graph):
    """The matrix product that makes the logits (the head's), found back from the output through additions."""
    producers = {output: node for node in graph.node for output in node.output}
    node = producers.get("logits")
    while node is not None and node.op_type not in ("MatMul", "Gemm", "MatMulInteger", "Einsum"):
        node = next((producers[name] for name in node.input if name in producers), None)
    return node


def _write_metadata(onnx, path: Path, model: TaskModel, structure: bool, int8: bool, inputs: list[str]) -> None:
    graph = onnx.load(str(path))
    record = {
        "kind": "structure" if structure else "task",
        "method": model.method,
        "classes": model.classes,
        "preprocessing": model.preprocessing.to_record(),
        "backbone": model.backbone.record(),
        "structure": structure_key(model),
        "inputs": inputs,
        "int8": int8,
        "opset": OPSET,
    }
    del graph.metadata_props[:]
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA, json.dumps(record)
    onnx.save(graph, str(path))


def read_metadata(path: str | os.PathLike) -> dict:
    """What :func:`export_onnx` recorded in a graph."""
    onnx, _ = _onnx_modules()
    props = {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    if METADATA not in props:
        raise ValueError(f"{path} was not exported by vptune (no {METADATA!r} metadata)")
    return json.loads(props[METADATA])


def _session(path: str | os.PathLike, threads: int | None, spinning: bool = True):
    """An ONNX Runtime session on the CPU; without ``spinning`` its threads sleep between runs instead of spinning
    (fairer to other work in the process, such as PyTorch measured beside it)."""
    _, ort = _onnx_modules()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxTask:
    """A task graph run by ONNX Runtime: ``OnnxTask(path)(pixel_values) -> logits`` (numpy), with the task's
    ``classes`` and ``preprocessing``."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, spinning: bool = True):
        self.record = read_metadata(path)
        if self.record["kind"] != "task":
            raise ValueError(f"{path} is a structure graph: run it with OnnxTasks")
        self.session = _session(path, threads, spinning)
        self.classes: list[str] = self.record["classes"]
        self.preprocessing = Preprocessing.from_record(self.record["preprocessing"])

    def __call__(self, pixel_values: torch.Tensor | np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        return self.session.run(["logits"], {"pixel_values": pixels})[0]


class OnnxTasks:
    """A structure graph and the tasks it serves: each sample's task tensors gathered from the tasks' rows.

    Args:
        path: a structure graph (``export_onnx(..., structure=True)``).
        tasks: task folders or loaded models, by name (each of the graph's structure and backbone).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tasks: dict[str, TaskModel | str | os.PathLike],
        threads: int | None = None,
        spinning: bool = True,
    ):
        self.record = read_metadata(path)
        if self.record["kind"] != "structure":
            raise ValueError(f"{path} is a task graph: run it with OnnxTask")
        self.session = _session(path, threads, spinning)
        self.names = [name.replace("/", ".") for name in self.record["inputs"][1:]]
        self.rows: dict[str, dict[str, np.ndarray]] = {}
        self.classes: dict[str, list[str]] = {}
        self.preprocessing: dict[str, Preprocessing] = {}
        for name, task in tasks.items():
            self.add(name, task)

    def add(self, name: str, task: TaskModel | str | os.PathLike) -> None:
        model = task if isinstance(task, TaskModel) else load_task(task)
        fingerprint = self.record["backbone"]["fingerprint"]
        if model.backbone.fingerprint() != fingerprint:
            raise ValueError(f"task {name!r} is on backbone {model.backbone.fingerprint()}, the graph's {fingerprint}")
        if structure_key(model) != self.record["structure"]:
            raise ValueError(f"task {name!r} has another prompt structure than the graph's: export its own graph")
        state = model.state_dict()
        self.rows[name] = {key: state[key].detach().float().numpy()[0] for key in self.names}
        self.classes[name] = model.classes
        self.preprocessing[name] = model.preprocessing

    def __call__(self, pixel_values: torch.Tensor | np.ndarray, names: list[str]) -> list[np.ndarray]:
        """Each sample's logits (numpy), with its task's tensors."""
        unknown = sorted(set(names) - set(self.rows))
        if unknown:
            raise KeyError(f"no task named {unknown[0]!r}; these graphs serve: {', '.join(self.rows)}")
        widest = max(len(self.classes[name]) for name in names)
        feeds = {"pixel_values": np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))}
        for key, input_name in zip(self.names, self.record["inputs"][1:], strict=True):
            feeds[input_name] = np.stack([_padded(self.rows[name][key], key, widest) for name in names])
        logits = self.session.run(["logits"], feeds)[0]
        return [row[: len(self.classes[name])] for row, name in zip(logits, names, strict=True)]


def _padded(tensor: np.ndarray, key: str, classes: int) -> np.ndarray:
    """A head tensor padded to ``classes`` rows (cut back after the run), others as they are."""
    if key not in ("head.weight", "head.bias") or tensor.shape[0] == classes:
        return tensor
    pad = [(0, classes - tensor.shape[0])] + [(0, 0)] * (tensor.ndim - 1)
    return np.pad(tensor, pad)
