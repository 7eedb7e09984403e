"""ConvNet backbones (transformers ConvNextModel, ResNetModel): VPT's pixel prompts (a border, extra channels), the
baselines that apply, and the refusal of the token-based ones; tiny random models built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import images, tiny_backbone
from test_cache import fixed
from transformers import ConvNextConfig, ConvNextModel, ResNetConfig, ResNetModel

import vptune
from vptune import PromptConfig, TaskFileError
from vptune.batched import fit_batched
from vptune.cli import main
from vptune.engine import Splits
from vptune.perf import main as perf_main
from vptune.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize
from vptune.prompts import BorderPrompts

CONV_FAMILIES = ("convnext", "resnet")
SIZE, TOKENS, CLASSES = 16, 2, 3
# vpt-shallow: the default location (pad); below: p extra input channels through a widened first convolution
METHODS = ("linear", "mlp-2", "partial-1", "bias", "full", "vpt-shallow", "below")
FIRST_CONV = {"convnext": "embeddings.patch_embeddings", "resnet": "embedder.embedder.convolution"}


def tiny_conv_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random ConvNet: 2 stages of 8 and 16 channels, one block each; random biases and (ResNet) running
    statistics, so that a dropped bias or a batch norm left in training mode would show."""
    torch.manual_seed(seed)
    if family == "convnext":
        config = ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=SIZE, layer_scale_init_value=1.0,
            drop_path_rate=0.1,
        )  # fmt: skip
        model = ConvNextModel(config)
    else:
        config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
        model = ResNetModel(config)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("bias"):
                tensor.normal_(0.0, 0.1)
            elif name.endswith("running_mean"):
                tensor.normal_(0.0, 0.2)
            elif name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
    return model.eval()


def conv_backbone(family: str, seed: int = 0) -> vptune.Backbone:
    return vptune.wrap_model(tiny_conv_model(family, seed), spec=f"tiny-{family}")


def make(method: str, backbone: vptune.Backbone, seed: int = 0) -> vptune.TaskModel:
    if method == "below":
        return vptune.build("vpt-shallow", backbone, CLASSES, PromptConfig(TOKENS, location="below"), SIZE, seed)
    prompt = PromptConfig(num_tokens=TOKENS) if method == "vpt-shallow" else None  # the default location
    return vptune.build(method, backbone, CLASSES, prompt, SIZE, seed=seed)


def pixels(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return normalize(images(batch, SIZE, seed), vptune.backbones.IMAGENET_MEAN, vptune.backbones.IMAGENET_STD)


def sgd_steps(model: vptune.TaskModel, steps: int = 2) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, labels = pixels(6, seed=3), torch.arange(6) % CLASSES
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    model.eval()


def expected_trainable(family: str, method: str, backbone: vptune.Backbone) -> set[str]:
    """The parameters each method should train, named independently of the builders."""
    head = {"head.weight", "head.bias"} if method != "mlp-2" else set()
    names = [f"backbone.{name}" for name, _ in backbone.named_parameters()]
    if method == "mlp-2":
        return set()  # checked apart: every trainable tensor is in the head
    if method == "partial-1":
        last = {n for n in names if ".encoder.stages.1." in n or n.startswith("backbone.model.layernorm.")}
        return last | head
    if method == "bias":
        return {n for n in names if n.endswith(".bias")} | head
    if method == "full":
        return set(names) | head
    if method == "vpt-shallow":
        return {"prompts.embeddings"} | head
    if method == "below":
        conv = f"backbone.model.{FIRST_CONV[family]}"
        return {"prompts.embeddings", f"{conv}.weight"} | ({f"{conv}.bias"} if family == "convnext" else set()) | head
    return head


@pytest.fixture(params=CONV_FAMILIES)
def conv_family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_loads_from_a_folder_and_pools_as_transformers_does(conv_family: str, tmp_path: Path) -> None:
    model = tiny_conv_model(conv_family)
    model.save_pretrained(tmp_path)
    backbone = vptune.load_backbone(f"hf:{tmp_path}")
    assert backbone.family == conv_family and not backbone.capabilities and backbone.depth == 2 and backbone.width == 16
    assert backbone.fingerprint() == vptune.wrap_model(model).fingerprint()
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model(x).pooler_output.flatten(1), atol=1e-6, rtol=0)


def test_two_resnets_that_differ_only_in_a_batch_norms_statistics_have_two_fingerprints(tmp_path) -> None:
    ours, theirs = conv_backbone("resnet"), conv_backbone("resnet")
    norm = next(module for module in theirs.modules() if isinstance(module, torch.nn.BatchNorm2d))
    with torch.no_grad():
        norm.running_mean[0] += 1e-3  # a buffer: no parameter differs
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True))
    assert ours.fingerprint() != theirs.fingerprint()
    vptune.save_task(make("vpt-shallow", ours), tmp_path)
    with pytest.raises(TaskFileError, match="fingerprint"):
        vptune.load_task(tmp_path, backbone=theirs)


@pytest.mark.parametrize("method", METHODS)
def test_trains_only_its_tensors_and_leaves_the_backbone(conv_family: str, method: str) -> None:
    backbone = conv_backbone(conv_family)
    shared = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}  # parameters and buffers
    model = make(method, backbone)
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if method == "mlp-2":
        assert trainable and all(name.startswith("head.") for name in trainable)
    else:
        assert set(trainable) == expected_trainable(conv_family, method, model.backbone)
    learned = set(model.task_state_dict())
    frozen = {n: t.clone() for n, t in model.state_dict().items() if n not in learned}
    sgd_steps(model)
    after = model.state_dict()
    assert all(not torch.equal(after[n], trainable[n]) for n in trainable), "every trainable tensor learns"
    assert all(torch.equal(after[n], frozen[n]) for n in frozen), "every frozen tensor (running stats too) stays"
    assert all(torch.equal(tensor, shared[name]) for name, tensor in backbone.state_dict().items())
    assert not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("method", ["full", "bias", "vpt-shallow"])
def test_batch_norms_keep_their_statistics_while_training(method: str) -> None:
    backbone = conv_backbone("resnet")
    model = make(method, backbone)
    statistics = {name: buffer.clone() for name, buffer in model.backbone.named_buffers()}
    model.train()
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(norm.training for norm in norms)
    sgd_steps(model, steps=3)
    assert all(torch.equal(buffer, statistics[name]) for name, buffer in model.backbone.named_buffers())


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_give_the_same_logits(conv_family: str, method: str, tmp_path: Path) -> None:
    backbone = conv_backbone(conv_family)
    model = make(method, backbone, seed=3)
    sgd_steps(model)
    vptune.save_task(model, tmp_path, classes=["a", "b", "c"])
    loaded = vptune.load_task(tmp_path, backbone=backbone)
    x = pixels(seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    record = vptune.read_record(tmp_path)
    assert record["backbone"]["family"] == conv_family and set(record["tensors"]) == set(model.task_state_dict())
    with pytest.raises(TaskFileError, match="fingerprint"):
        vptune.load_task(tmp_path, backbone=conv_backbone(conv_family, seed=1))


@pytest.mark.parametrize("method", METHODS)
def test_a_samples_logits_do_not_depend_on_its_batch(conv_family: str, method: str) -> None:
    model = make(method, conv_backbone(conv_family), seed=2)
    sgd_steps(model)
    x = pixels(5, seed=4)
    with torch.no_grad():
        together = model(x)
        for row in range(len(x)):
            torch.testing.assert_close(together[row], model(x[row : row + 1])[0], atol=1e-5, rtol=0)


def test_the_border_holds_12p_s_plus_p_pixels_around_the_unchanged_image(conv_family: str) -> None:
    backbone = conv_backbone(conv_family)
    model = make("vpt-shallow", backbone, seed=1)
    assert model.prompt_config.location == "pad" and isinstance(model.prompts, BorderPrompts)
    assert model.prompts.embeddings[0].numel() == 12 * TOKENS * (SIZE + TOKENS)
    seen = []
    hook = backbone.patch_embed.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = pixels(3)
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    p, s = TOKENS, SIZE
    (padded,) = seen
    assert padded.shape == (3, 3, s + 2 * p, s + 2 * p)
    assert torch.equal(padded[:, :, p : p + s, p : p + s], x)  # the image, unchanged, inside the border
    # the border: the stored pixels (0..1 scale) normalised as the images are, the same for every sample
    values = model.prompts.embeddings.detach()[0]
    split = 3 * 2 * p * (s + 2 * p)
    mean, std = (torch.tensor(values).view(3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))
    top_bottom = (values[:split].view(3, 2 * p, s + 2 * p) - mean) / std
    left_right = (values[split:].view(3, s, 2 * p) - mean) / std
    close = lambda a, b: torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # noqa: E731
    for sample in padded:
        close(sample[:, :p], top_bottom[:, :p]) and close(sample[:, p + s :], top_bottom[:, p:])
        close(sample[:, p : p + s, :p], left_right[..., :p])
        close(sample[:, p : p + s, p + s :], left_right[..., p:])
    with torch.no_grad():  # logits = head(backbone(padded image))
        torch.testing.assert_close(logits, model.head(backbone(padded)), atol=1e-6, rtol=0)
    assert 0.0 <= values.min() and values.max() <= 1.0  # the released code's start: uniform 0..1 pixels


def test_prompts_change_the_output(conv_family: str) -> None:
    backbone, x = conv_backbone(conv_family), pixels()
    for method in ("vpt-shallow", "below"):
        model = make(method, backbone, seed=1)
        with torch.no_grad():
            before = model(x)
            model.prompts.embeddings.add_(0.5)
            assert not torch.allclose(model(x), before, atol=1e-4)


def test_below_widens_the_first_convolution(conv_family: str) -> None:
    backbone = conv_backbone(conv_family)
    model = make("below", backbone)
    wide, pretrained = model.backbone.patch_embed, backbone.patch_embed
    assert wide.in_channels == 3 + TOKENS and wide.weight.requires_grad and wide is not pretrained
    assert torch.equal(wide.weight[:, :3], pretrained.weight) and wide.weight[:, 3:].abs().sum() > 0
    assert model.prompts.embeddings.shape == (1, TOKENS, SIZE, SIZE)
    seen = []
    wide.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = pixels(2)
    with torch.no_grad():
        model(x)
    assert seen[0].shape == (2, 3 + TOKENS, SIZE, SIZE) and torch.equal(seen[0][:, :3], x)
    mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3  # the released code's: one value for every channel
    expected = (model.prompts.embeddings.detach() - mean) / std
    torch.testing.assert_close(seen[0][:, 3:], expected.expand(2, -1, -1, -1), atol=1e-6, rtol=0)
    assert model.backbone.tuned_parameters == wide.weight.numel() + (wide.bias.numel() if wide.bias is not None else 0)


@pytest.mark.parametrize("method", ["vpt-deep", "vpt-deep+bias", "adapter", "lora", "sidetune"])
def test_token_methods_are_refused_with_the_reason(conv_family: str, method: str) -> None:
    with pytest.raises(ValueError, match=r"has no tokens: use one of .*vpt-shallow.*--location pad"):
        vptune.build(method, conv_backbone(conv_family), CLASSES, image_size=SIZE)


def test_partial_counts_stages(conv_family: str) -> None:
    backbone = conv_backbone(conv_family)
    model = vptune.build("partial-2", backbone, CLASSES, image_size=SIZE)  # every stage
    assert all(p.requires_grad for p in model.backbone.blocks.parameters())
    assert not model.backbone.patch_embed.weight.requires_grad  # the stem stays frozen
    with pytest.raises(ValueError, match="only 2 stages"):
        vptune.build("partial-3", backbone, CLASSES, image_size=SIZE)


@pytest.mark.parametrize("location", ["prepend", "add", "prepend-pixel", "concat-channel"])
def test_token_locations_are_refused_with_what_to_use(location: str) -> None:
    prompt = PromptConfig(num_tokens=TOKENS, location=location)
    with pytest.raises(ValueError, match=r"has no tokens: use location 'pad' \(--location pad"):
        vptune.build("vpt-shallow", conv_backbone("resnet"), CLASSES, prompt, SIZE)


def test_pixel_prompts_refuse_what_does_not_apply() -> None:
    backbone = conv_backbone("convnext")
    with pytest.raises(ValueError, match="no tokens: use vpt-shallow with --location pad"):
        vptune.build("vpt-shallow", backbone, CLASSES, PromptConfig(num_tokens=2, layers=[1]), SIZE)
    with pytest.raises(ValueError, match="take no dropout"):
        PromptConfig(num_tokens=2, location="pad", dropout=0.1)
    with pytest.raises(ValueError, match="prompts the input only"):
        PromptConfig(num_tokens=2, location="pad", deep=True)
    with pytest.raises(ValueError, match="pooled features"):
        PromptConfig(num_tokens=2, location="pad", readout="image")
    with pytest.raises(ValueError, match="built for 16x16 input"):
        make("vpt-shallow", backbone)(normalize(images(1, 20), backbone.mean, backbone.std))
    with pytest.raises(ValueError, match="prompts a ConvNet's pixels; vit is a Transformer"):
        vptune.build("vpt-shallow", tiny_backbone("vit"), CLASSES, PromptConfig(num_tokens=2, location="pad"), SIZE)


def test_cached_training_starts_after_the_frozen_stages(conv_family: str) -> None:
    backbone, x = conv_backbone(conv_family), pixels()
    expected = {"linear": 3, "partial-1": 1, "vpt-shallow": 0, "bias": 0}
    for method, point in expected.items():
        model = make(method, backbone, seed=1)
        assert model.cache_point() == point, method
        with torch.no_grad():
            torch.testing.assert_close(model(model.trunk(x, point), start=point), model(x), atol=1e-6, rtol=0)


def test_one_backbone_serves_mixed_batches_of_convnet_tasks(conv_family: str) -> None:
    backbone = conv_backbone(conv_family)
    tasks = [make("vpt-shallow", backbone, 1), make("linear", backbone, 2), make("vpt-shallow", backbone, 3)]
    for task in tasks:
        sgd_steps(task)
    served = vptune.MultiTask(backbone, tasks)
    assert len(served.groups()) == 2  # the two bordered tasks stacked into one group
    ids = torch.tensor([0, 1, 2, 2, 0, 1])
    x = pixels(len(ids), seed=7)
    with torch.no_grad():
        for row, (logits, index) in enumerate(zip(served(x, ids), ids.tolist(), strict=True)):
            torch.testing.assert_close(logits, tasks[index](x[row : row + 1])[0], atol=1e-5, rtol=0)
    for method in ("below", "full"):
        with pytest.raises(ValueError, match="changes the backbone's weights or computation"):
            vptune.MultiTask(backbone, [make(method, backbone)])


def test_batched_border_training_equals_separate_runs(tmp_path: Path) -> None:
    backbone, splits = conv_backbone("resnet"), Splits(fixed(8), val=fixed(4, seed=1))
    configs = [
        vptune.TrainConfig(epochs=1, warmup_epochs=0, batch_size=4, base_lr=lr, seed=seed, data_seed=0, progress=False)
        for lr, seed in ((0.5, 0), (0.2, 1))
    ]
    together = [make("vpt-shallow", backbone, seed=config.seed) for config in configs]
    fit_batched(together, splits, configs)
    for model, config in zip(together, configs, strict=True):
        alone = make("vpt-shallow", backbone, seed=config.seed)
        vptune.fit(alone, splits, config)
        for name, tensor in alone.trainable_state_dict().items():
            torch.testing.assert_close(model.trainable_state_dict()[name], tensor, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def saved_resnet(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-resnet")
    tiny_conv_model("resnet").save_pretrained(folder)
    return f"hf:{folder}"


def test_vptune_train_runs_a_bordered_convnet_end_to_end(tmp_path, saved_resnet, tiny_task, capsys) -> None:
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_task), "--backbone", saved_resnet, "--method", "vpt-shallow"]
    argv += ["--num-tokens", "2", "--image-size", "16", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    record = vptune.read_record(out)
    assert record["prompt"]["location"] == "pad" and record["backbone"]["family"] == "resnet"
    assert "prompts.embeddings" in record["tensors"]  # the border and the head, nothing of the backbone
    assert all(name.startswith(("prompts.", "head.")) for name in record["tensors"])
    assert record["tensors"]["prompts.embeddings"] == [1, 12 * 2 * (16 + 2)]
    loaded = vptune.load_task(out)
    assert loaded.prompt_config.location == "pad" and loaded.classes == ["red", "green", "blue"]
    capsys.readouterr()
    image = next((tiny_task / "images").glob("test_*.png"))
    assert main(["predict", str(out), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] in ("red", "green", "blue")
    assert main(["inspect", str(out)]) == 0 and "pad" in capsys.readouterr().out


def test_a_run_spec_keeps_the_default_location_through_json(saved_resnet) -> None:
    spec = vptune.RunSpec("unused", "vpt-shallow", saved_resnet, SIZE, PromptConfig(num_tokens=TOKENS))
    again = vptune.RunSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # as a sweep hands its runs over
    assert "location" not in spec.to_dict()["prompt"] and again.prompt == spec.prompt
    model = vptune.build("vpt-shallow", vptune.load_backbone(saved_resnet), CLASSES, again.prompt, SIZE)
    assert model.prompt_config.location == "pad"
    chosen = vptune.RunSpec("unused", "vpt-shallow", saved_resnet, SIZE, PromptConfig(TOKENS, location="prepend"))
    assert vptune.RunSpec.from_dict(chosen.to_dict()).prompt.location == "prepend"  # a chosen one is kept


def test_the_harness_measures_a_convnet_row(tmp_path, saved_resnet, capsys) -> None:
    out = tmp_path / "perf.json"
    argv = ["--backbone", saved_resnet, "--image-size", "16", "--batch-size", "4", "--repeats", "1", "--warmup", "1"]
    assert perf_main([*argv, "--no-fresh", "--gemm-size", "64", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert {"vpt-shallow", "full", "linear", "bias"} <= set(rows) and "vpt-deep" not in rows  # what applies
    assert all(row["step_seconds"] > 0 and row["flops_per_image"] > 0 for row in rows.values())
    assert 0 < rows["vpt-shallow"]["saved_bytes"] and rows["full"]["time_vs_full"] == 1.0
    assert set(result["inference_images_per_s"]) == {"backbone", "vpt-shallow"}
    assert result["data_time_row"] == "vpt-shallow" and result["data_time_fraction"] > 0  # the first row here
    assert "| vpt-shallow |" in capsys.readouterr().out
