"""Prompts and the task model: where prompts enter, what reads them out, what trains, and what is refused."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import DEPTH, IMAGE, PATCH, WIDTH, pixels
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTConfig, ViTModel

import vptune
from vptune import PromptConfig
from vptune.prompts import LOCATIONS, READOUTS, xavier_bound

P = 3  # prompt tokens
PATCHES = (IMAGE // PATCH) ** 2
CLASSES = 5


def make(backbone: vptune.Backbone, method: str = "vpt-deep", seed: int = 0, **prompt) -> vptune.TaskModel:
    """A model for ``CLASSES`` classes at ``IMAGE`` pixels; ``deep`` follows the method unless given."""
    prompt = PromptConfig(**{"deep": method == "vpt-deep", **prompt})
    return vptune.build(method, backbone, CLASSES, prompt, image_size=IMAGE, seed=seed)


@contextmanager
def block_io(backbone: vptune.Backbone) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record each block's input and output token sequence during the forwards run inside the block."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def before(module, args, kwargs):
        inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def after(module, args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles = [block.register_forward_pre_hook(before, with_kwargs=True) for block in backbone.blocks]
    handles += [block.register_forward_hook(after) for block in backbone.blocks]
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


# --- where prepended prompts enter -------------------------------------------------------------------------------

# Per block, what its input holds at the prompt positions: an int j = fresh prompts of set j, "flow" = the previous
# block's outputs there, None = no prompt tokens in the sequence at all.
INSERTION = {
    "shallow": ("vpt-shallow", {}, [0, "flow", "flow"]),
    "deep": ("vpt-deep", {}, [0, 1, 2]),
    "deep-first-2": ("vpt-deep", {"layers": [0, 1]}, [0, 1, "flow"]),
    "deep-last-2": ("vpt-deep", {"layers": [-2, -1]}, [None, 0, 1]),
    "deep-middle": ("vpt-deep", {"layers": [1]}, [None, 0, "flow"]),
    "deep-skip": ("vpt-deep", {"layers": [2, 0]}, [0, "flow", 1]),
    "deep-shared": ("vpt-deep", {"shared": True}, [0, 0, 0]),
    "deep-shared-last-2": ("vpt-deep", {"layers": [1, 2], "shared": True}, [None, 0, 0]),
    "deep-first-2-drop": ("vpt-deep", {"layers": [0, 1], "drop_after": True}, [0, 1, None]),
    "shallow-drop": ("vpt-shallow", {"drop_after": True}, [0, None, None]),
    "shallow-at-block-1": ("vpt-shallow", {"layers": [1]}, [None, 0, "flow"]),
    "deep-drop-image-readout": ("vpt-deep", {"layers": [0], "drop_after": True, "readout": "image"}, [0, None, None]),
}


@pytest.mark.parametrize("case", INSERTION)
def test_prompt_insertion(backbone: vptune.Backbone, case: str) -> None:
    method, options, plan = INSERTION[case]
    model = make(backbone, method, num_tokens=P, **options).eval()
    model.skip_unread = False  # whole blocks run, so that block hooks see every token
    x = pixels(backbone, 2)
    with block_io(backbone) as (inputs, outputs), torch.no_grad():
        logits = model(x)
        embedded = backbone.embed(x)
    assert logits.shape == (2, CLASSES) and torch.isfinite(logits).all()
    sets = 1 if options.get("shared") else len({source for source in plan if isinstance(source, int)})
    assert model.prompts.embeddings.shape == (1, sets, P, WIDTH)
    prefix = backbone.num_prefix_tokens
    for index, source in enumerate(plan):
        tokens, previous = inputs[index], embedded if index == 0 else outputs[index - 1]
        count = 0 if source is None else P
        assert tokens.shape == (2, prefix + count + PATCHES, WIDTH), f"block {index}"
        # class/register and patch tokens come on from the previous block (the embedding: prompts follow positions)
        assert torch.equal(tokens[:, :prefix], previous[:, :prefix])
        assert torch.equal(tokens[:, prefix + count :], previous[:, -PATCHES:])
        segment, before = tokens[:, prefix : prefix + count], previous[:, prefix : prefix + count]
        if source == "flow":
            assert torch.equal(segment, before), f"block {index}: prompt outputs should flow on"
        elif source is not None:
            assert torch.equal(segment, model.prompts.embeddings[0, source].expand_as(segment)), f"block {index}"
            if previous.shape[1] == tokens.shape[1] and index > 0:
                assert not torch.allclose(segment, before), f"block {index}: previous prompt outputs not replaced"


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_prompt_order_does_not_matter(backbone: vptune.Backbone, method: str) -> None:
    model = make(backbone, method, num_tokens=5).eval()
    x = pixels(backbone, 4)
    with torch.no_grad():
        before = model(x)
        model.prompts.embeddings.copy_(model.prompts.embeddings[:, :, [4, 2, 0, 3, 1]])
        shuffled = model(x)
        model.prompts.embeddings.add_(0.1 * torch.randn_like(model.prompts.embeddings))
        changed = model(x)
    torch.testing.assert_close(shuffled, before, atol=1e-5, rtol=0)
    assert (changed - before).abs().max() > 1e-3  # the prompts do reach the logits


# --- the other locations -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_add_location_adds_to_every_token(backbone: vptune.Backbone, method: str) -> None:
    model = make(backbone, method, num_tokens=P, location="add").eval()
    model.skip_unread = False  # whole blocks run, so that block hooks see every token
    x = pixels(backbone, 2)
    with block_io(backbone) as (inputs, outputs), torch.no_grad():
        model(x)
        embedded = backbone.embed(x)
    added = model.prompts.embeddings
    assert added.shape == (1, DEPTH if method == "vpt-deep" else 1, backbone.num_prefix_tokens + PATCHES, WIDTH)
    for index in range(DEPTH):
        previous = embedded if index == 0 else outputs[index - 1]
        expected = previous + added[0, index] if index < added.shape[1] else previous
        torch.testing.assert_close(inputs[index], expected, atol=1e-6, rtol=0)


def test_prepend_pixel_prompts_pass_through_the_patch_embedding(backbone: vptune.Backbone) -> None:
    model = make(backbone, "vpt-shallow", num_tokens=P, location="prepend-pixel").eval()
    model.skip_unread = False  # whole blocks run, so that block hooks see every token
    assert model.prompts.embeddings.shape == (1, 1, P, 3 * PATCH * PATCH)
    x = pixels(backbone, 2)
    with block_io(backbone) as (inputs, _), torch.no_grad():
        model(x)
        patches = model.prompts.embeddings[0, 0].reshape(P, 3, PATCH, PATCH)
        expected = backbone.patch_embed(patches).flatten(1)  # extra patches, without positions
    prefix = backbone.num_prefix_tokens
    assert inputs[0].shape[1] == prefix + P + PATCHES
    torch.testing.assert_close(inputs[0][:, prefix : prefix + P], expected.expand(2, -1, -1), atol=1e-6, rtol=0)


def test_projected_prompts(backbone: vptune.Backbone) -> None:
    model = make(backbone, "vpt-deep", num_tokens=P, project=8).eval()
    model.skip_unread = False  # whole blocks run, so that block hooks see every token
    assert model.prompts.embeddings.shape == (1, DEPTH, P, 8)
    assert model.prompts.embeddings.abs().max() <= xavier_bound(PATCH, 8)  # bound uses the stored width k
    proj = model.prompts.proj  # as the released code: kaiming-normal over the fan-out, nn.Linear's bias
    assert proj.bias.abs().max() <= 1 / math.sqrt(8) and proj.bias.abs().min() > 0
    wide = vptune.build("vpt-deep", backbone, 3, PromptConfig(project=64), IMAGE, seed=2).prompts.proj.weight
    assert wide.std().item() == pytest.approx(math.sqrt(2 / WIDTH), rel=0.1)  # fan-out = d
    x = pixels(backbone, 2)
    with block_io(backbone) as (inputs, _), torch.no_grad():
        model(x)
        prefix = backbone.num_prefix_tokens
        for index in range(DEPTH):
            expected = model.prompts.proj(model.prompts.embeddings[0, index])
            torch.testing.assert_close(inputs[index][:, prefix : prefix + P], expected.expand(2, -1, -1))


# --- read-out --------------------------------------------------------------------------------------------------

POOL = {
    "cls": lambda tokens, prefix: tokens[:, 0],
    "image": lambda tokens, prefix: tokens[:, prefix + P :].mean(1),
    "prompt": lambda tokens, prefix: tokens[:, prefix : prefix + P].mean(1),
    "all": lambda tokens, prefix: tokens[:, prefix:].mean(1),  # prompts and patches, as the released code
}


@pytest.mark.parametrize("readout", READOUTS)
def test_readout_pools_the_right_tokens(backbone: vptune.Backbone, readout: str) -> None:
    model = make(backbone, "vpt-deep", num_tokens=P, readout=readout).eval()
    model.skip_unread = False  # whole blocks run, so that block hooks see every token
    with block_io(backbone) as (_, outputs), torch.no_grad():
        features = model.forward_features(pixels(backbone, 2))
        last, prefix = outputs[-1], backbone.num_prefix_tokens
        assert last.shape == (2, prefix + P + PATCHES, WIDTH)
        if backbone.pool_before_norm:  # MAE: pool the last block's outputs, then its fc_norm
            expected = backbone.norm(POOL[readout](last, prefix))
        else:
            expected = POOL[readout](backbone.norm(last), prefix)
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=0)


# --- every variant trains its prompts and nothing of the backbone ------------------------------------------------

VARIANTS = [
    ("vpt-shallow", {"location": "prepend"}),
    ("vpt-deep", {"location": "prepend", "dropout": 0.1}),
    ("vpt-deep", {"location": "prepend", "project": 8}),
    ("vpt-shallow", {"location": "add"}),
    ("vpt-deep", {"location": "add"}),
    ("vpt-shallow", {"location": "prepend-pixel"}),
    ("vpt-shallow", {"location": "concat-channel"}),
]
TOKEN_LOCATIONS = ("prepend", "prepend-pixel")
TRAINING = [
    (method, {**options, "readout": readout})
    for (method, options), readout in itertools.product(VARIANTS, READOUTS)
    if readout != "prompt" or options["location"] in TOKEN_LOCATIONS
]


def variant_id(case: tuple[str, dict]) -> str:
    method, options = case
    return "-".join([method.removeprefix("vpt-"), *(f"{key}={value}" for key, value in options.items())])


def test_variant_table_covers_every_location() -> None:
    assert {options["location"] for _, options in TRAINING} == set(LOCATIONS)
    assert {options["readout"] for _, options in TRAINING} == set(READOUTS)


@pytest.mark.parametrize("case", TRAINING, ids=variant_id)
def test_variant_trains_prompts_only(backbone: vptune.Backbone, case: tuple[str, dict]) -> None:
    method, options = case
    model = make(backbone, method, num_tokens=P, **options).train()
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert "prompts.embeddings" in trainable and {"head.weight", "head.bias"} <= set(trainable)
    embedding = {f"backbone.{name}" for name in backbone.names_of(backbone.patch_embed)}
    trains_embedding = options["location"] == "concat-channel"  # as the released code: the whole patch embedding
    assert {name for name in trainable if name.startswith("backbone.")} == (embedding if trains_embedding else set())
    start = {name: p.detach().clone() for name, p in trainable.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    x, labels = pixels(backbone, 4), torch.tensor([0, 1, 2, 3])
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        assert torch.isfinite(loss)
        loss.backward()
        for name, param in trainable.items():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert model.prompts.embeddings.grad.abs().sum() > 0
        assert all(param.grad is None for param in backbone.parameters())  # the shared backbone: never
        optimizer.step()
    for name, param in trainable.items():
        assert not torch.equal(param, start[name]), f"{name} did not change"


def test_prompt_dropout_only_while_training(backbone: vptune.Backbone) -> None:
    x = pixels(backbone, 2)
    noisy, clean = make(backbone, num_tokens=P, dropout=0.5), make(backbone, num_tokens=P, dropout=0.0)
    with torch.no_grad():
        assert not torch.equal(noisy.train()(x), noisy(x))
        assert torch.equal(noisy.eval()(x), noisy(x))
        # without prompt dropout the model is deterministic in training mode: the backbone's own dropout is off
        assert torch.equal(clean.train()(x), clean(x))


# --- parameter counts and initialisation -------------------------------------------------------------------------


def head(d: int = WIDTH, c: int = CLASSES) -> int:
    return d * c + c


# (method, prompt options, trainable parameters as a function of the number of prefix tokens)
COUNTS = {
    "linear": ("linear", None, lambda prefix: head()),
    "shallow": ("vpt-shallow", {"num_tokens": 4}, lambda prefix: 4 * WIDTH + head()),
    "deep": ("vpt-deep", {"num_tokens": 4}, lambda prefix: DEPTH * 4 * WIDTH + head()),
    "deep-project": (
        "vpt-deep",
        {"num_tokens": 4, "project": 8},
        lambda prefix: DEPTH * 4 * 8 + 8 * WIDTH + WIDTH + head(),
    ),
    "deep-shared": ("vpt-deep", {"num_tokens": 4, "shared": True}, lambda prefix: 4 * WIDTH + head()),
    "deep-first-2": (
        "vpt-deep",
        {"num_tokens": 4, "layers": [0, 1], "deep": True},
        lambda prefix: 2 * 4 * WIDTH + head(),
    ),
    "shallow-add": ("vpt-shallow", {"location": "add"}, lambda prefix: (prefix + PATCHES) * WIDTH + head()),
    "deep-add": ("vpt-deep", {"location": "add"}, lambda prefix: DEPTH * (prefix + PATCHES) * WIDTH + head()),
    "prepend-pixel": ("vpt-shallow", {"num_tokens": 4, "location": "prepend-pixel"}, lambda prefix: 4 * 48 + head()),
    # the 2 extra channels' pixels and their kernels in the patch embedding, which trains whole (added in the test)
    "concat-channel": (
        "vpt-shallow",
        {"num_tokens": 2, "location": "concat-channel"},
        lambda prefix: 2 * IMAGE**2 + WIDTH * 2 * 16 + head(),
    ),
}


@pytest.mark.parametrize("case", COUNTS)
def test_trainable_parameter_count(backbone: vptune.Backbone, case: str) -> None:
    method, options, formula = COUNTS[case]
    prompt = PromptConfig(**options) if options is not None else None
    model = vptune.build(method, backbone, CLASSES, prompt, image_size=IMAGE)
    expected = formula(backbone.num_prefix_tokens)
    if options and options.get("location") == "concat-channel":
        expected += sum(param.numel() for param in backbone.patch_embed.parameters())
    assert model.num_trainable() == expected
    assert sum(t.numel() for t in model.trainable_state_dict().values()) == expected
    assert model.head.weight.shape == (1, CLASSES, WIDTH)


@pytest.mark.parametrize(
    ("init", "check"),
    [
        ("xavier", lambda values: values.abs().max() <= xavier_bound(PATCH, WIDTH) < values.abs().max() / 0.9),
        ("normal", lambda values: abs(values.std().item() - 0.02) < 0.002 and abs(values.mean().item()) < 0.002),
        ("zeros", lambda values: not values.any()),
    ],
)
def test_prompt_initialisation(backbone: vptune.Backbone, init: str, check) -> None:
    model = make(backbone, "vpt-deep", num_tokens=50, init=init)
    assert check(model.prompts.embeddings.detach())


def test_seed_decides_the_initialisation(backbone: vptune.Backbone) -> None:
    first, again, other = (make(backbone, num_tokens=P, seed=seed) for seed in (0, 0, 1))
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.trainable_state_dict().values(), again.trainable_state_dict().values(), strict=True)
    )
    assert not torch.equal(first.prompts.embeddings, other.prompts.embeddings)
    assert not torch.equal(first.head.weight, other.head.weight)


@pytest.fixture(scope="module")
def vit_b16() -> vptune.Backbone:
    """ViT-B/16's shapes (d=768, N=12, s=16, 224x224) on the meta device: the paper's numbers, no real weights."""
    with torch.device("meta"):
        model = ViTModel(
            ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
        )
    return vptune.wrap_model(model, spec="vit-b16-shapes")


@pytest.mark.parametrize(
    ("method", "prompts", "percent"), [("vpt-shallow", 38_400, "0.04"), ("vpt-deep", 460_800, "0.53")]
)
def test_paper_vit_b16_numbers(vit_b16: vptune.Backbone, method: str, prompts: int, percent: str) -> None:
    assert round(vit_b16.num_parameters() / 1e6) == 86
    model = vptune.build(method, vit_b16, 100, PromptConfig(num_tokens=50))
    assert model.prompts.embeddings.numel() == prompts
    assert f"{100 * prompts / vit_b16.num_parameters():.2f}" == percent
    assert model.num_trainable() == prompts + 768 * 100 + 100
    bound = math.sqrt(6 / (3 * 16 * 16 + 768))
    assert bound == xavier_bound(16, 768) == 0.0625
    values = model.prompts.embeddings.detach().abs()
    assert values.max() <= 0.0625 and (values > 0.05).any()


# --- several tasks in one batch ----------------------------------------------------------------------------------

TASK_CASES = {
    "linear": ("linear", None),
    "shallow": ("vpt-shallow", {"num_tokens": P}),
    "deep": ("vpt-deep", {"num_tokens": P}),
    "deep-shared-image": ("vpt-deep", {"num_tokens": P, "shared": True, "readout": "image"}),
    "deep-project": ("vpt-deep", {"num_tokens": P, "project": 8}),
    "add": ("vpt-deep", {"location": "add"}),
    "prepend-pixel": ("vpt-shallow", {"num_tokens": P, "location": "prepend-pixel", "readout": "prompt"}),
    "concat-channel": ("vpt-shallow", {"location": "concat-channel"}),
}


@pytest.mark.parametrize("case", TASK_CASES)
def test_per_sample_task_selection(backbone: vptune.Backbone, case: str) -> None:
    method, options = TASK_CASES[case]
    prompt = PromptConfig(**options) if options is not None else None
    tasks = [vptune.build(method, backbone, CLASSES, prompt, image_size=IMAGE, seed=seed).eval() for seed in (1, 2)]
    if tasks[0].prompts is not None and tasks[0].prompts.proj is not None:  # the projection is shared by all tasks
        tasks[1].prompts.proj.load_state_dict(tasks[0].prompts.proj.state_dict())
    joint = vptune.build(method, backbone, CLASSES, prompt, image_size=IMAGE, seed=0).eval()
    stacked = {  # what the tasks learned (their head's statistics too), along the task dimension
        name: torch.cat([task.task_state_dict()[name] for task in tasks]) if tensor.shape[0] == 1 else tensor
        for name, tensor in tasks[0].task_state_dict().items()
    }
    parameters = dict(joint.named_parameters())
    for name, tensor in stacked.items():
        module, attribute = joint.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        setattr(module, attribute, nn.Parameter(tensor.clone()) if name in parameters else tensor.clone())
    x = pixels(backbone, 5)
    task_ids = torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        mixed = joint(x, task_ids=task_ids)
        alone = [task(x) for task in tasks]
        first = joint(x)
    expected = torch.where((task_ids == 1)[:, None], alone[1], alone[0])
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(first, alone[0], atol=1e-5, rtol=0)  # no task_ids: task 0


# --- refused configurations ----------------------------------------------------------------------------------------

INVALID = {
    "prompt readout without prompts": (lambda bb: PromptConfig(num_tokens=0, readout="prompt"), "readout 'prompt'"),
    "prompt readout with add": (lambda bb: PromptConfig(location="add", readout="prompt"), "readout 'prompt'"),
    "prompt readout after drop": (lambda bb: PromptConfig(readout="prompt", drop_after=True), "drop_after"),
    "drop_after with add": (lambda bb: PromptConfig(location="add", drop_after=True), "drop_after"),
    "drop_after with channel": (lambda bb: PromptConfig(location="concat-channel", drop_after=True), "drop_after"),
    "prepend-pixel deep": (lambda bb: make(bb, "vpt-deep", location="prepend-pixel"), "prompts the input only"),
    "concat-channel deep": (lambda bb: make(bb, "vpt-deep", location="concat-channel"), "prompts the input only"),
    "prepend-pixel project": (lambda bb: PromptConfig(location="prepend-pixel", project=8), "project"),
    "shallow several layers": (lambda bb: make(bb, "vpt-shallow", layers=[0, 1], deep=True), "one"),
    "layer out of range": (lambda bb: make(bb, "vpt-deep", layers=[0, DEPTH]), "out of range"),
    "negative layer out of range": (lambda bb: make(bb, "vpt-deep", layers=[-DEPTH - 1]), "out of range"),
    "same layer twice": (lambda bb: make(bb, "vpt-deep", layers=[0, -DEPTH]), "repeated"),
    "no layers": (lambda bb: PromptConfig(layers=[]), "empty"),
    "negative tokens": (lambda bb: PromptConfig(num_tokens=-1), "num_tokens"),
    "dropout 1": (lambda bb: PromptConfig(dropout=1.0), "dropout"),
    "negative project": (lambda bb: PromptConfig(project=-1), "project"),
    "unknown location": (lambda bb: PromptConfig(location="append"), "location"),
    "unknown readout": (lambda bb: PromptConfig(readout="max"), "readout"),
    "unknown init": (lambda bb: PromptConfig(init="orthogonal"), "init"),
    "unknown method": (lambda bb: vptune.build("vpt-wide", bb, 3), "unknown method"),
    "no classes": (lambda bb: vptune.build("linear", bb, 0), "num_classes"),
    "size not a patch multiple": (lambda bb: vptune.build("vpt-deep", bb, 3, image_size=18), "multiple of the patch"),
    "unknown option": (lambda bb: vptune.build("linear", bb, 3, image_size=IMAGE, hidden=4), "does not take options"),
    "add at another size": (lambda bb: make(bb, location="add")(pixels(bb, 1, 24)), "add"),
    "channel at another size": (
        lambda bb: make(bb, "vpt-shallow", location="concat-channel")(pixels(bb, 1, 24)),
        "16x16",
    ),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_configurations_are_refused(backbone: vptune.Backbone, case: str) -> None:
    attempt, message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        attempt(backbone)


def test_several_layers_mean_deep_prompts(backbone: vptune.Backbone) -> None:
    assert PromptConfig(layers=[0, 1]).deep is True
    assert PromptConfig(layers=[1]).deep is False
    model = vptune.build("vpt-deep", backbone, 3, prompt=PromptConfig(num_tokens=2, layers=[0, 1]), image_size=IMAGE)
    assert model.prompts.layers == [0, 1] and model.prompts.embeddings.shape[1] == 2


# --- outputs nothing reads are not computed ----------------------------------------------------------------------


def logits_and_gradients(model: vptune.TaskModel, x: torch.Tensor, skip_unread: bool):
    model.skip_unread = skip_unread
    model.zero_grad(set_to_none=True)
    logits = model(x)
    logits.square().sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", [*INSERTION, *(f"readout-{readout}" for readout in READOUTS)])
def test_skipping_unread_outputs_changes_no_logit_and_no_gradient(backbone: vptune.Backbone, case: str) -> None:
    method, options, _ = INSERTION.get(case, ("vpt-deep", {"readout": case.removeprefix("readout-")}, None))
    model = make(backbone, method, num_tokens=P, **options).eval()  # eval: no prompt dropout, gradients still flow
    model, x = model.double(), pixels(backbone, 3).double()  # float64: summation order leaves no trace
    reference, reference_grads = logits_and_gradients(model, x, skip_unread=False)
    with FlopCounterMode(display=False) as counter:
        logits, grads = logits_and_gradients(model, x, skip_unread=True)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    with FlopCounterMode(display=False) as whole:
        logits_and_gradients(model, x, skip_unread=False)
    replaced = len(model.prompts.layers) > 1  # a later block's fresh prompts replace a block's prompt outputs
    skips = model.prompt_config.readout == "cls" or replaced or options.get("drop_after")
    assert (counter.get_total_flops() < whole.get_total_flops()) == bool(skips)


@pytest.mark.parametrize("method", ["vpt-deep", "vpt-shallow"])
def test_deep_prompts_enter_attention_without_joining_the_sequence(
    backbone: vptune.Backbone, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VPT-Deep's prompts, replaced at every block, are keys and values only: no block's input holds them.
    VPT-Shallow's prompts are read by the next blocks: they stay in the sequence."""
    model = make(backbone, method, num_tokens=P, readout="cls").eval()  # (MAE's default reads the last prompts)
    seen, run_block = [], backbone.run_block

    def spy(index, tokens, skip=None, context=None):
        seen.append((tokens.shape[1], None if context is None else context.shape[1]))
        return run_block(index, tokens, skip, context)

    monkeypatch.setattr(backbone, "run_block", spy)
    model(pixels(backbone, 2))
    sequence = backbone.num_prefix_tokens + backbone.num_patches(IMAGE)
    expected = [(sequence, P)] * DEPTH if method == "vpt-deep" else [(sequence + P, None)] * DEPTH
    assert seen == expected


def test_skipping_unread_outputs_dispatches_no_more_operators_than_whole_blocks(backbone: vptune.Backbone) -> None:
    """Where a GPU waits on Python issuing kernels (small models), each operator costs time whatever its size: the
    partial blocks and the prompts as keys and values must not issue more operators than whole blocks."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    model = make(backbone, "vpt-deep", num_tokens=P).eval()
    x = pixels(backbone, 2)
    counts = {}
    for skip_unread in (False, True):
        Count.calls = 0
        with Count():
            logits_and_gradients(model, x, skip_unread)
        counts[skip_unread] = Count.calls
    assert counts[True] <= counts[False]


# One table: every location, read-out, depth variant and projection of the prompts, and every registered method with
# its defaults; skipping unread outputs (the default) gives the logits and gradients of whole blocks (1e-5).
DEPTHS = {
    "shallow": ("vpt-shallow", {}),
    "shallow-at-block-1": ("vpt-shallow", {"layers": [1]}),
    "deep": ("vpt-deep", {}),
    "deep-last-2": ("vpt-deep", {"layers": [-2, -1]}),
    "deep-shared": ("vpt-deep", {"shared": True}),
    "deep-first-2-drop-after": ("vpt-deep", {"layers": [0, 1], "drop_after": True}),
}


def _variants() -> dict[str, tuple[str, dict]]:
    table = {}
    for location, readout, depth, project in itertools.product(LOCATIONS, READOUTS, DEPTHS, (0, 8)):
        method, options = DEPTHS[depth]
        options = {**options, "location": location, "readout": readout, "project": project, "num_tokens": P}
        try:
            PromptConfig(deep=method == "vpt-deep", **options)
        except ValueError:
            continue  # a combination the paper does not define (e.g. a deep pixel-space prompt)
        table[f"{location}-{readout}-{depth}-project{project}"] = (method, options)
    for name in vptune.METHODS:
        if not vptune.METHODS[name].prompted:
            table[f"method-{name}"] = (name.replace("<k>", "2"), {})
    return table


SKIP_TABLE = _variants()


def test_the_table_covers_every_variant() -> None:
    keys = " ".join(SKIP_TABLE)
    assert all(location in keys for location in LOCATIONS) and all(f"-{r}-" in keys for r in READOUTS)
    assert all(depth in keys for depth in DEPTHS) and "project8" in keys and len(SKIP_TABLE) > 60
    assert {f"method-{name}" for name in vptune.METHODS if not vptune.METHODS[name].prompted} <= set(SKIP_TABLE)


@pytest.mark.parametrize("case", SKIP_TABLE)
def test_skipping_unread_outputs_equals_whole_blocks(backbone: vptune.Backbone, case: str) -> None:
    method, options = SKIP_TABLE[case]
    prompt = PromptConfig(deep=method == "vpt-deep", **options) if options else None
    model = vptune.build(method, backbone, CLASSES, prompt, image_size=IMAGE, seed=1).eval()  # eval: no dropout
    model, x = model.double(), pixels(backbone, 3).double()  # float64: summation order leaves no trace at 1e-5
    reference, reference_grads = logits_and_gradients(model, x, skip_unread=False)
    logits, grads = logits_and_gradients(model, x, skip_unread=True)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert grads.keys() == reference_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=0, msg=name)
