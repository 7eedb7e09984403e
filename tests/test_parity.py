"""The released code's details (docs/fidelity.md, "Matched to the released code"), each pinned by a test that fails
against the behaviour vptune had before: per-sample prompt dropout, the MLP-k head, the adapter's GELU, weight decay
spared on the head's bias, the head's initialisation, concat-channel prompts, full fine-tuning's dropout, the ``all``
read-out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import IMAGE, PATCH, WIDTH, pixels, tiny_backbone
from torch import nn

import vptune
from vptune import PromptConfig, TrainConfig
from vptune.engine import make_optimizer
from vptune.head import HEAD_BIAS


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_every_sample_draws_its_own_prompt_dropout(method: str) -> None:
    backbone = tiny_backbone("dinov2")
    model = vptune.build(method, backbone, 5, PromptConfig(num_tokens=4, dropout=0.5), IMAGE, seed=0).train()
    x = pixels(backbone, 1).expand(8, -1, -1, -1)  # 8 copies of one image
    torch.manual_seed(0)
    logits = model(x)
    assert len({tuple(row.tolist()) for row in logits}) == 8  # a mask per sample, so 8 different rows
    model.eval()
    assert torch.allclose(model(x), model(x[:1]).expand(8, -1), atol=1e-6)  # no dropout at evaluation


def test_mlp_head_is_linear_relu_batchnorm_dropout() -> None:
    model = vptune.build("mlp-3", tiny_backbone("vit"), 7, image_size=IMAGE)
    hidden = model.head.hidden
    assert len(hidden) == 2
    for layer in hidden:
        assert [type(m) for m in layer] == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout] and layer[3].p == 0.1
    big = vptune.build("mlp-2", tiny_backbone("vit"), 7, image_size=IMAGE, seed=1)  # a (d, d) kaiming fan-out draw
    assert big.head.hidden[0][0].weight.std().item() == pytest.approx(math.sqrt(2 / WIDTH), rel=0.1)


def test_mlp_head_batchnorm_statistics_are_stored_and_reloaded(tmp_path) -> None:
    backbone = tiny_backbone("vit")
    model = vptune.build("mlp-2", backbone, 3, image_size=IMAGE).train()
    x = pixels(backbone, 8)
    for _ in range(3):
        model(x)  # training forwards move the running statistics
    model.eval()
    stats = model.head.hidden[0][2].running_mean
    assert stats.abs().sum() > 0
    vptune.save_task(model, tmp_path)
    stored = vptune.read_record(tmp_path)["tensors"]
    assert {"head.hidden.0.2.running_mean", "head.hidden.0.2.running_var"} <= set(stored)
    loaded = vptune.load_task(tmp_path, backbone=backbone)
    assert torch.equal(loaded.head.hidden[0][2].running_mean, stats)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_adapter_uses_gelu() -> None:
    adapter = vptune.methods.Adapter(WIDTH, reduction=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.up.weight.normal_()
    h = torch.randn(5, WIDTH)
    torch.testing.assert_close(adapter(h), h + adapter.up(F.gelu(adapter.down(h))))
    assert not torch.allclose(adapter(h), h + adapter.up(F.relu(adapter.down(h))))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("method", ["vpt-deep", "mlp-2"])
def test_weight_decay_spares_only_the_heads_bias(method: str, optimizer: str) -> None:
    prompt = PromptConfig(num_tokens=2) if method == "vpt-deep" else None
    model = vptune.build(method, tiny_backbone("vit"), 3, prompt, IMAGE)
    config = TrainConfig(base_lr=25.6, batch_size=10, weight_decay=0.1, optimizer=optimizer, momentum=0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optim = make_optimizer(model, config)
    for param in model.parameters():
        param.grad = torch.zeros_like(param) if param.requires_grad else None
    optim.step()  # zero gradients: only weight decay moves anything (by lr x wd = 0.1 of each tensor)
    bias = "head.bias" if method == "vpt-deep" else "head.out.bias"
    for name, param in model.named_parameters():
        if param.requires_grad:
            expected = before[name] if name == bias else 0.9 * before[name]
            torch.testing.assert_close(param.detach(), expected, msg=name)


def test_head_starts_as_the_released_code_when_asked() -> None:
    model = vptune.build("linear", tiny_backbone("vit"), 500, image_size=IMAGE, seed=0, head_init="released")
    weight, bias = model.head.weight[0], model.head.bias[0]
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 500), rel=0.05)  # kaiming normal, fan-out = C
    assert weight.mean().abs().item() < 0.01
    assert torch.equal(bias, torch.full((500,), HEAD_BIAS)) and HEAD_BIAS == pytest.approx(-math.log(99))
    default = vptune.build("linear", tiny_backbone("vit"), 500, image_size=IMAGE, seed=0).head  # see fidelity.md
    bound = 1 / math.sqrt(WIDTH)
    assert default.weight.abs().max() <= bound
    assert default.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)  # uniform's standard deviation
    assert default.bias.abs().max() <= bound and default.bias.std() > 0


def test_concat_channel_adds_p_channels_and_trains_the_patch_embedding() -> None:
    backbone = tiny_backbone("vit")
    shared = {name: t.clone() for name, t in backbone.state_dict().items()}
    model = vptune.build("vpt-shallow", backbone, 3, PromptConfig(num_tokens=2, location="concat-channel"), IMAGE)
    prompts, conv = model.prompts, model.backbone.patch_embed
    assert prompts.embeddings.shape == (1, 1, 2, IMAGE * IMAGE) and prompts.channel_kernel.shape == (1, WIDTH, 2 * 16)
    bound = vptune.prompts.xavier_bound(PATCH, WIDTH)
    assert prompts.channel_kernel.abs().max() <= bound and prompts.channel_kernel.std() > bound / 3  # random kernels
    assert conv.weight.requires_grad and conv.bias.requires_grad and model.backbone is not backbone
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"prompts.embeddings", "prompts.channel_kernel", "head.weight", "head.bias"} | {
        f"backbone.{name}" for name in backbone.names_of(backbone.patch_embed)
    }
    x = pixels(backbone, 2)
    wider = nn.Conv2d(5, WIDTH, PATCH, stride=PATCH)  # the released code: one convolution over RGB + p channels
    kernels = prompts.channel_kernel[0].view(WIDTH, 2, PATCH, PATCH)
    with torch.no_grad():
        wider.weight.copy_(torch.cat([conv.weight, kernels], 1))
        wider.bias.copy_(conv.bias)
        channels = prompts.embeddings[0, 0].view(1, 2, IMAGE, IMAGE).expand(2, -1, -1, -1)
        tokens = wider(torch.cat([x, channels], 1)).flatten(2).transpose(1, 2)
        embedded = model.backbone.embed(x, patch_delta=prompts.patch_delta(None, x))
    torch.testing.assert_close(embedded[:, 1:] - model.backbone.positions(embedded, IMAGE, IMAGE)[:, 1:], tokens)
    assert all(torch.equal(t, shared[n]) for n, t in backbone.state_dict().items())  # the shared one is untouched
    with pytest.raises(ValueError, match="changes the backbone's weights"):
        vptune.MultiTask(backbone, [model])


def test_full_fine_tuning_keeps_the_backbones_dropout() -> None:
    backbone = tiny_backbone("vit")  # configured with hidden and attention dropout 0.1
    full = vptune.build("full", backbone, 3, image_size=IMAGE).train()
    assert full.backbone.training and full.backbone.model.training
    x = pixels(backbone, 2)
    assert not torch.equal(full(x), full(x))  # dropout draws
    full.eval()
    assert torch.equal(full(x), full(x))
    for method in ("linear", "bias", "lora"):  # every other method keeps the frozen backbone in eval mode
        other = vptune.build(method, backbone, 3, image_size=IMAGE).train()
        assert not other.backbone.training and torch.equal(other(x), other(x))


def test_all_readout_averages_prompts_and_patches_without_the_class_token() -> None:
    backbone = tiny_backbone("dinov2-registers")
    model = vptune.build("vpt-shallow", backbone, 3, PromptConfig(num_tokens=2, readout="all"), IMAGE).eval()
    model.skip_unread = False
    normed = []
    backbone.norm.register_forward_hook(lambda module, args, output: normed.append(output))
    with torch.no_grad():
        features = model.forward_features(pixels(backbone, 2))
    prefix = backbone.num_prefix_tokens  # the class token and the registers
    torch.testing.assert_close(features, normed[0][:, prefix:].mean(1))
    assert not torch.allclose(features, normed[0].mean(1))
