"""Mixed-task batches over one backbone: every sample gets exactly what its task alone gives."""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGE, pixels, tiny_backbone

import vptune
from vptune.multitask import MultiTask


def task(backbone: vptune.Backbone, method: str, classes: int, seed: int, **prompt) -> vptune.TaskModel:
    config = vptune.PromptConfig(**prompt) if prompt else None
    model = vptune.build(method, backbone, classes, config, IMAGE, seed=seed)
    with torch.no_grad():  # trained-looking heads: a distinct head per task shows in the logits
        model.head.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def zoo(backbone: vptune.Backbone) -> list[vptune.TaskModel]:
    return [
        task(backbone, "vpt-deep", 3, seed=1, num_tokens=3),
        task(backbone, "vpt-deep", 5, seed=2, num_tokens=3),  # same structure: stacked with the first
        task(backbone, "vpt-shallow", 4, seed=3, num_tokens=2),
        task(backbone, "linear", 2, seed=4),
        task(backbone, "vpt-deep", 3, seed=5, num_tokens=2, project=8),  # its own projection: its own group
        task(backbone, "vpt-deep", 6, seed=6, num_tokens=4, layers=[-1], readout="image"),
    ]


def test_mixed_batch_equals_each_task_alone(family: str) -> None:
    backbone = tiny_backbone(family)
    tasks = zoo(backbone)
    served = MultiTask(backbone, tasks)
    ids = torch.tensor([0, 3, 1, 5, 2, 4, 0, 1, 4, 5, 3, 2])
    x = pixels(backbone, batch=len(ids), seed=7)
    logits = served(x, ids)
    assert len(served.groups()) == 5
    for row, index in enumerate(ids.tolist()):
        alone = tasks[index](x[row : row + 1])[0]
        assert logits[row].shape == alone.shape
        torch.testing.assert_close(logits[row], alone, atol=1e-5, rtol=0)


def test_tasks_come_and_go_while_serving(tmp_path) -> None:
    backbone = tiny_backbone("dinov2")
    tasks = zoo(backbone)[:3]
    for index, model in enumerate(tasks):
        vptune.save_task(model, tmp_path / f"t{index}")
    served = MultiTask(backbone, [tmp_path / "t0", tmp_path / "t1"])
    assert served.names == ["t0", "t1"]
    x = pixels(backbone, batch=2)
    before = served(x, [0, 1])
    served.add(tmp_path / "t2")
    torch.testing.assert_close(served(x[:1], [2])[0], tasks[2](x[:1])[0], atol=1e-5, rtol=0)
    served.remove("t0")
    assert served.names == ["t1", "t2"]
    torch.testing.assert_close(served(x[1:], [0])[0], before[1], atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="no task named 't0'"):
        served.remove("t0")
    with pytest.raises(ValueError, match="already served"):
        served.add(tmp_path / "t1")


def test_refusals_are_clear() -> None:
    backbone = tiny_backbone("vit")
    served = MultiTask(backbone, [task(backbone, "linear", 2, seed=0)])
    with pytest.raises(ValueError, match="changes the backbone's weights or computation"):
        served.add(vptune.build("bias", backbone, 2, image_size=IMAGE))
    other = tiny_backbone("vit", seed=1)
    with pytest.raises(ValueError, match="load it on this backbone"):
        served.add(vptune.build("linear", other, 2, image_size=IMAGE), name="other")
    x = pixels(backbone, batch=2)
    with pytest.raises(ValueError, match="task ids must be in 0..0"):
        served(x, [0, 1])
    with pytest.raises(ValueError, match="one per image"):
        served(x, [0])


def test_every_tensor_follows_the_images_device() -> None:
    """The GPU fix, checked on the CPU: on the ``meta`` device (shapes only), a mixed batch given as a list of task
    ids computes on the images' device alone (task ids kept on the CPU would fail to index the prompts there)."""
    backbone = tiny_backbone("dinov2")
    served = MultiTask(backbone, zoo(backbone)).to("meta")
    ids = [0, 3, 1, 5, 2, 4]
    logits = served(pixels(backbone, batch=len(ids)).to("meta"), ids)
    assert [value.device.type for value in logits] == ["meta"] * len(ids)
    assert [value.shape[0] for value in logits] == [3, 2, 5, 6, 4, 3]


def test_evaluate_moves_the_model_to_the_device_it_is_given() -> None:
    """The other GPU fix, checked on the CPU: the model goes to ``device`` (``meta`` computes shapes only, so the
    score itself cannot be read there)."""
    from conftest import tiny_dataset

    model = task(tiny_backbone("vit"), "vpt-deep", 3, seed=0, num_tokens=2)
    with pytest.raises((NotImplementedError, RuntimeError), match="meta"):
        vptune.evaluate(model, tiny_dataset(4), device="meta")
    assert {param.device.type for param in model.parameters()} == {"meta"}
