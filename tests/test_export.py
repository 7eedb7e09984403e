"""ONNX export checked against PyTorch with ONNX Runtime: a task graph for every servable method on every family with
tokens, a structure graph serving several tasks (other class counts) with each sample's tensors as inputs, int8,
refusals with their reason, and the command."""

from __future__ import annotations

import json

import conftest
import numpy as np
import pytest
import torch
from conftest import family_backbone

import vptune
from vptune.backbones import FAMILIES

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from vptune.cli import main  # noqa: E402
from vptune.export import OnnxTask, OnnxTasks, export_onnx, head_product, read_metadata  # noqa: E402

TOKEN_FAMILIES = sorted(
    variant
    for name, family in FAMILIES.items()
    if "tokens" in family.capabilities
    for variant in ({"dinov2": ("dinov2", "dinov2-registers"), "timm": ("timm-vit",)}.get(name, (name,)))
)
SERVABLE = ("vpt-shallow", "vpt-deep", "linear")
TOLERANCE = 1e-4


def trained_looking(backbone, method: str, classes: int, seed: int, **prompt) -> vptune.TaskModel:
    """conftest's, at the backbone's own input size."""
    return conftest.trained_looking(backbone, method, classes, seed, backbone.image_size, **prompt)


def images(backbone, batch: int, seed: int) -> torch.Tensor:
    size = backbone.image_size
    return torch.randn(batch, backbone.in_chans, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", TOKEN_FAMILIES)
def test_task_and_structure_graphs_equal_pytorch(variant: str, tmp_path) -> None:
    """Every servable method on every family: VPT-Shallow and linear as task graphs, VPT-Deep as a structure graph
    (two tasks, two class counts) and, on ViT and DINOv2, also as a task graph (elsewhere its task graph runs the
    same forward as its structure graph, one row: each export takes seconds)."""
    backbone = family_backbone(variant)
    tasks = {method: trained_looking(backbone, method, 3 + i, seed=i) for i, method in enumerate(SERVABLE)}
    x = images(backbone, 5, seed=1)  # a batch size other than the export's
    for method, model in tasks.items():
        if method == "vpt-deep" and variant not in ("vit", "dinov2"):
            continue
        path = export_onnx(model, tmp_path / f"{method}.onnx")
        with torch.no_grad():
            reference = model(x).numpy()
        got = OnnxTask(path)(x)
        assert got.shape == reference.shape
        assert np.abs(got - reference).max() <= TOLERANCE, (variant, method)
    other = trained_looking(backbone, "vpt-deep", 6, seed=9)  # the same structure, another class count
    graph = export_onnx(tasks["vpt-deep"], tmp_path / "structure.onnx", structure=True)
    served = OnnxTasks(graph, {"a": tasks["vpt-deep"], "b": other})
    names = ["a", "b", "b", "a", "b"]
    for row, (name, logits) in enumerate(zip(names, served(x, names), strict=True)):
        model = tasks["vpt-deep"] if name == "a" else other
        with torch.no_grad():
            alone = model(x[row : row + 1])[0].numpy()
        assert logits.shape == alone.shape and np.abs(logits - alone).max() <= TOLERANCE, (variant, row)


def test_designs_export_and_a_structure_graph_refuses_another_structure(tmp_path) -> None:
    backbone = family_backbone("dinov2")
    kv = trained_looking(backbone, "vpt-deep", 4, seed=0, kv_tokens=2, fourier=0.5)
    x = images(backbone, 3, seed=2)
    graph = export_onnx(kv, tmp_path / "kv.onnx", structure=True)
    assert read_metadata(graph)["inputs"] == [
        "pixel_values", "prompts/embeddings", "prompts/kv_keys", "prompts/kv_values", "head/weight", "head/bias",
        "head/norm/running_mean", "head/norm/running_var",
    ]  # fmt: skip
    served = OnnxTasks(graph, {"kv": kv})
    with torch.no_grad():
        assert np.abs(np.stack(served(x, ["kv"] * 3)) - kv(x).numpy()).max() <= TOLERANCE
    with pytest.raises(ValueError, match="another prompt structure"):
        served.add("plain", trained_looking(backbone, "vpt-deep", 4, seed=1))
    heads = [trained_looking(backbone, "linear", classes, seed=classes) for classes in (2, 7)]
    linear = OnnxTasks(export_onnx(heads[0], tmp_path / "linear.onnx", structure=True), {"two": heads[0]})
    linear.add("seven", heads[1])  # a head-only structure: the head's tensors are the inputs
    for row, (logits, model) in enumerate(zip(linear(x[:2], ["seven", "two"]), heads[::-1], strict=True)):
        with torch.no_grad():
            assert np.abs(logits - model(x[row : row + 1])[0].numpy()).max() <= TOLERANCE
    with pytest.raises(ValueError, match="on backbone"):
        served.add("foreign", trained_looking(family_backbone("dinov2", seed=1), "vpt-deep", 4, seed=0, kv_tokens=2))


def test_what_cannot_share_a_backbone_is_refused_as_a_structure_graph_but_exports_as_a_task(tmp_path) -> None:
    backbone = family_backbone("vit")
    lora = vptune.build("lora", backbone, 3, image_size=backbone.image_size, seed=0).eval()
    with pytest.raises(ValueError, match="changes the backbone"):
        export_onnx(lora, tmp_path / "lora-structure.onnx", structure=True)
    projected = trained_looking(backbone, "vpt-deep", 3, seed=0, project=8)
    with pytest.raises(ValueError, match="module of their own"):
        export_onnx(projected, tmp_path / "projected.onnx", structure=True)
    x = images(backbone, 2, seed=3)
    for model in (lora, projected):  # one task, baked in: any method
        with torch.no_grad():
            reference = model(x).numpy()
        assert np.abs(OnnxTask(export_onnx(model, tmp_path / "t.onnx"))(x) - reference).max() <= TOLERANCE


def test_int8_quantises_the_backbone_and_keeps_prompts_and_head(tmp_path) -> None:
    import onnx

    backbone = family_backbone("dinov2")
    model = trained_looking(backbone, "vpt-deep", 3, seed=0)
    fp32, int8 = export_onnx(model, tmp_path / "fp32.onnx"), export_onnx(model, tmp_path / "int8.onnx", int8=True)
    graph = onnx.load(str(int8)).graph
    assert sum(node.op_type == "MatMulInteger" for node in graph.node) >= 3 * backbone.depth  # q, k, v, o, MLP
    assert head_product(graph).op_type in ("MatMul", "Gemm", "Einsum")  # the head stays fp32
    assert read_metadata(int8)["int8"] and not read_metadata(fp32)["int8"]
    x = images(backbone, 4, seed=4)
    a, b = OnnxTask(fp32)(x), OnnxTask(int8)(x)
    assert np.abs(a - b).max() > 0  # quantised
    assert np.abs(a - b).max() < 0.2 * np.abs(a).max()  # and close


def test_export_command_writes_a_graph_that_predicts_as_the_task(tmp_path, saved_backbone, capsys) -> None:
    backbone = vptune.load_backbone(saved_backbone)
    model = trained_looking(backbone, "vpt-deep", 3, seed=0)
    folder = vptune.save_task(model, tmp_path / "task", classes=["a", "b", "c"])
    out = tmp_path / "graphs" / "task.onnx"
    assert main(["export", str(folder), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "max |ONNX Runtime - PyTorch|" in printed
    loaded = OnnxTask(out)
    assert loaded.classes == ["a", "b", "c"] and loaded.preprocessing == model.preprocessing
    x = images(backbone, 2, seed=5)
    with torch.no_grad():
        assert np.abs(loaded(x) - model(x).numpy()).max() <= TOLERANCE
    assert main(["export", str(folder), "--format", "tflite", "--out", str(out)]) != 0
    assert json.loads(json.dumps(read_metadata(out)))["backbone"]["fingerprint"] == backbone.fingerprint()
