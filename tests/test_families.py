"""Every registered backbone family through the one protocol: the matrix is the family registry itself, so that a
family registered without a tiny case here fails (conftest.family_backbone says where to add one).

On each: the prompt configuration resolved once and idempotently, the prompts the family makes answering the
prompt modules' interface, ``model.apply(fn)`` (nn.Module's own) on a prompted model, the fingerprint seeing every
parameter and buffer, the cached trunk composing with the rest, and mixed-task batches from stacked prompts.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_VARIANTS, family_backbone

import vptune
from vptune.backbones import FAMILIES
from vptune.prompts import PromptConfig, PromptModule

CASES = [variant for family in sorted(FAMILIES) for variant in FAMILY_VARIANTS.get(family, (family,))]
SIZE, CLASSES = 16, 3


def inputs(backbone: vptune.Backbone, batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, backbone.in_chans, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def prompted(backbone: vptune.Backbone, seed: int = 0) -> vptune.TaskModel:
    return vptune.build("vpt-shallow", backbone, CLASSES, PromptConfig(num_tokens=2), SIZE, seed=seed)


def test_every_registered_family_has_a_case() -> None:
    assert {family_backbone(case).family for case in CASES} == set(FAMILIES)
    with pytest.raises(LookupError, match="add one to family_backbone"):
        family_backbone("not-a-family")


@pytest.mark.parametrize("case", CASES)
def test_the_family_resolves_a_prompt_once_and_makes_its_prompts(case: str) -> None:
    backbone = family_backbone(case)
    resolved = backbone.resolve_prompt(PromptConfig(num_tokens=2))
    assert resolved.resolved and backbone.resolve_prompt(resolved) == resolved
    model = prompted(backbone)
    assert model.prompt_config == resolved and isinstance(model.prompts, PromptModule)
    assert model.prompts.num_tasks == 1 and model.prompts.entry_block == 0
    assert set(model.prompts.task_tensors) <= set(dict(model.prompts.named_parameters()))
    with pytest.raises(ValueError, match="resolve_prompt"):
        vptune.TaskModel(backbone, CLASSES, PromptConfig(num_tokens=2), SIZE)
    with torch.no_grad():
        assert model(inputs(backbone)).shape == (3, CLASSES)


@pytest.mark.parametrize("case", CASES)
def test_model_apply_visits_every_module_of_a_prompted_model(case: str) -> None:
    model = prompted(family_backbone(case))
    seen = []
    assert model.apply(seen.append) is model  # nn.Module.apply: every submodule, then the model itself
    assert len(seen) == len(list(model.modules())) and seen[-1] is model
    x = inputs(model.backbone)
    with torch.no_grad():
        before = model(x)
        model.apply(lambda module: torch.nn.init.zeros_(module.weight) if isinstance(module, vptune.head.Head) else 0)
        assert torch.equal(model(x), torch.zeros_like(before) + model.head.bias[0])  # the head zeroed through apply


@pytest.mark.parametrize("case", CASES)
def test_the_fingerprint_sees_every_parameter_and_buffer(case: str) -> None:
    reference = family_backbone(case).fingerprint()
    state = family_backbone(case).model.state_dict()
    names = [name for name, tensor in state.items() if tensor.numel()]
    buffers = {name for name, _ in family_backbone(case).model.named_buffers()}
    for name in [names[0], names[-1], *sorted(buffers & set(names))]:
        other = family_backbone(case)
        with torch.no_grad():
            tensor = other.model.state_dict()[name]
            tensor.add_(1e-3 if tensor.is_floating_point() else 1)
        assert other.fingerprint() != reference, name


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", ["linear", "partial-1"])
def test_the_cached_trunk_and_the_rest_compose_to_the_model(case: str, method: str) -> None:
    backbone = family_backbone(case)
    model = vptune.build(method, backbone, CLASSES, image_size=SIZE).eval()
    point, x = model.cache_point(), inputs(backbone)
    assert point == (backbone.depth + 1 if method == "linear" else backbone.depth - 1)
    with torch.no_grad():
        torch.testing.assert_close(model(model.trunk(x, point), start=point), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_stacked_prompts_serve_each_samples_own_task(case: str) -> None:
    backbone = family_backbone(case)
    tasks = [
        prompted(backbone, seed=1),
        vptune.build("linear", backbone, CLASSES, image_size=SIZE),
        prompted(backbone, 2),
    ]
    served = vptune.MultiTask(backbone, tasks)
    assert len(served.groups()) == 2  # the two prompted tasks stacked into one group
    ids = torch.tensor([2, 0, 1, 2])
    x = inputs(backbone, len(ids), seed=3)
    with torch.no_grad():
        for row, (logits, index) in enumerate(zip(served(x, ids), ids.tolist(), strict=True)):
            torch.testing.assert_close(logits, tasks[index].eval()(x[row : row + 1])[0], atol=1e-5, rtol=0)


def test_a_family_that_does_not_answer_the_protocol_says_how_to() -> None:
    class Unanswered(vptune.Backbone):
        family = "unanswered"

    backbone = Unanswered(family_backbone("vit").model, "x", (0.5,) * 3, (0.5,) * 3, SIZE)
    with pytest.raises(NotImplementedError, match=r"does not answer Backbone.resolve_prompt: .*TokenBackbone"):
        vptune.build("vpt-deep", backbone, CLASSES, image_size=SIZE)
    with pytest.raises(NotImplementedError, match="does not answer Backbone.blocks"):
        backbone.blocks  # noqa: B018
