"""Backbones: every wrapped family reproduces its own transformers forward, stays frozen and in eval mode."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import DEPTH, IMAGE, PATCH, PREFIX, WIDTH, pixels, tiny_backbone, tiny_hf_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers.activations import QuickGELUActivation

import vptune
from vptune.backbones import CLIP_MEAN, IMAGENET_MEAN, QuickGelu, drop_tokens, quick_gelu
from vptune.prompts import PromptConfig

# (height, width): the native size, and sizes whose position embeddings the family must interpolate
SIZES = [(IMAGE, IMAGE), (24, 24), (16, 24)]


def own_output(backbone: vptune.Backbone, family: str, x: torch.Tensor, before_norm: bool = False) -> torch.Tensor:
    """What the transformers model itself computes: every token after its final norm (or before it)."""
    hf = backbone.model
    kwargs = {} if family.startswith("dinov2") or x.shape[-2:] == (IMAGE, IMAGE) else {"interpolate_pos_encoding": True}
    if family == "mae":  # MAE's own forward masks at random: ask it to keep every patch, in order
        patches = (x.shape[-2] // PATCH) * (x.shape[-1] // PATCH)
        kwargs["noise"] = torch.arange(patches, dtype=torch.float32).expand(x.shape[0], -1)
    with torch.no_grad(), unmasked(hf):
        out = hf(pixel_values=x, output_hidden_states=before_norm, **kwargs)
        if before_norm:
            return out.hidden_states[-1]
        if family == "clip":  # CLIP's last_hidden_state is before its post-norm; its pooler is the normed cls
            torch.testing.assert_close(hf.post_layernorm(out.last_hidden_state)[:, 0], out.pooler_output)
            return hf.post_layernorm(out.last_hidden_state)
        return out.last_hidden_state


@contextmanager
def unmasked(model: nn.Module) -> Iterator[None]:
    """ViTMAE's own forward with a mask ratio of 0 while the context lasts (other models: unchanged)."""
    ratio = getattr(model.config, "mask_ratio", None)
    if ratio is not None:
        model.config.mask_ratio = 0.0
    try:
        yield
    finally:
        if ratio is not None:
            model.config.mask_ratio = ratio


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_forward_is_the_models_own_output(backbone: vptune.Backbone, family: str, size: tuple[int, int]) -> None:
    x = pixels(backbone, 2, size)
    with torch.no_grad():
        tokens = backbone(x)
    patches = (size[0] // PATCH) * (size[1] // PATCH)
    assert tokens.shape == (2, PREFIX[family] + patches, WIDTH)
    torch.testing.assert_close(tokens, own_output(backbone, family, x), atol=1e-6, rtol=0)


# Models whose prompts change nothing: none at all, or prompts that are zero where they are added
NEUTRAL = {
    "linear": ("linear", None),
    "shallow-p0": ("vpt-shallow", PromptConfig(num_tokens=0)),
    "deep-p0": ("vpt-deep", PromptConfig(num_tokens=0)),
    "add-zeros": ("vpt-deep", PromptConfig(location="add", init="zeros")),
    "concat-channel-zeros": ("vpt-shallow", PromptConfig(location="concat-channel", init="zeros")),
}


@pytest.mark.parametrize("size", [IMAGE, 24])
@pytest.mark.parametrize("case", NEUTRAL)
def test_neutral_model_features_are_the_backbones_own_read_out(
    backbone: vptune.Backbone, family: str, case: str, size: int
) -> None:
    method, prompt = NEUTRAL[case]
    model = vptune.build(method, backbone, 5, prompt=prompt, image_size=size).eval()
    x = pixels(backbone, 3, size)
    with torch.no_grad():
        features = model.forward_features(x)
    assert features.shape == (3, WIDTH)
    if backbone.pool_before_norm:  # MAE's read-out: the mean of the patch outputs through its fc_norm
        expected = backbone.norm(own_output(backbone, family, x, before_norm=True)[:, 1:].mean(1))
    else:
        expected = own_output(backbone, family, x)[:, 0]
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=0)


EXPECTED = {
    "vit": ("vit", 1, IMAGE, (0.5, 0.5, 0.5)),
    "dinov2": ("dinov2", 1, 224, IMAGENET_MEAN),  # DINOv2 configs say 518; everyone feeds it 224
    "dinov2-registers": ("dinov2", 3, 224, IMAGENET_MEAN),
    "clip": ("clip", 1, IMAGE, CLIP_MEAN),
    "mae": ("mae", 1, IMAGE, IMAGENET_MEAN),
}


def test_attributes(backbone: vptune.Backbone, family: str) -> None:
    name, prefix, image_size, mean = EXPECTED[family]
    assert (backbone.family, backbone.num_prefix_tokens, backbone.image_size, backbone.mean) == (
        name,
        prefix,
        image_size,
        tuple(mean),
    )
    assert (backbone.width, backbone.depth, backbone.patch_size, backbone.in_chans) == (WIDTH, DEPTH, PATCH, 3)
    assert len(backbone.blocks) == DEPTH and isinstance(backbone.patch_embed, nn.Conv2d)
    assert backbone.num_patches(24) == 36
    assert backbone.num_parameters() == sum(p.numel() for p in backbone.model.parameters()) > 0


def test_preprocessing_override(family: str) -> None:
    custom = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "image_size": 32}
    backbone = vptune.wrap_model(tiny_hf_model(family), preprocessing=custom)
    assert (backbone.mean, backbone.std, backbone.image_size) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 32)


def test_frozen_and_always_in_eval_mode(backbone: vptune.Backbone) -> None:
    assert not any(p.requires_grad for p in backbone.parameters())
    model = vptune.build("vpt-deep", backbone, 3, PromptConfig(num_tokens=2, dropout=0.1), image_size=IMAGE)
    for target in (backbone, model):
        target.train()
        assert not backbone.training
        assert not any(m.training for m in backbone.model.modules())
    assert model.training and model.prompts.training and model.head.training


def test_fingerprint_identifies_the_weights(family: str) -> None:
    first, again, other = tiny_backbone(family, seed=0), tiny_backbone(family, seed=0), tiny_backbone(family, seed=1)
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()
    assert re.fullmatch("[0-9a-f]{16}", first.fingerprint())
    record = first.record()
    assert record["fingerprint"] == first.fingerprint() and record["spec"] == f"tiny-{family}"
    assert (record["width"], record["depth"], record["parameters"]) == (WIDTH, DEPTH, first.num_parameters())


@pytest.mark.parametrize("where", ["first", "middle", "last", "final norm"])
def test_fingerprint_sees_every_tensor(tmp_path, family: str, where: str) -> None:
    """Backbones that differ in a single tensor, wherever it is, have different fingerprints; a task file trained on
    one is refused on the other."""
    ours, theirs = tiny_backbone(family), tiny_backbone(family)
    names = sorted(theirs.model.state_dict())
    name = {"first": names[0], "middle": names[len(names) // 2], "last": names[-1]}.get(where)
    tensor = theirs.norm.weight if where == "final norm" else theirs.model.state_dict()[name]
    with torch.no_grad():
        tensor.add_(1e-3)
    assert ours.fingerprint() != theirs.fingerprint()
    vptune.save_task(vptune.build("linear", ours, 2, image_size=IMAGE), tmp_path)
    with pytest.raises(vptune.TaskFileError, match="fingerprint"):
        vptune.load_task(tmp_path, backbone=theirs)


def test_other_families_are_refused() -> None:
    with pytest.raises(ValueError, match=f"unsupported backbone class Linear.*{'.*'.join(['ViTModel', 'Dinov2'])}"):
        vptune.wrap_model(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("spec", "message"),
    [("torchvision:vit_b_16", "unknown backbone spec"), ("resnet50", "unknown backbone spec"), ("hf:", "empty")],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        vptune.load_backbone(spec)
    assert "dinov2-small" in str(error.value) and "timm:<model name>" in str(error.value)  # the accepted forms


def test_load_backbone_from_a_saved_folder(tmp_path, family: str) -> None:
    """``hf:<folder>`` loads each family as from the Hub, preprocessing from preprocessor_config.json when present."""
    model = tiny_hf_model(family)
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "crop_size": {"height": 24, "width": 24}}'
    )
    loaded = vptune.load_backbone(f"hf:{tmp_path}")
    assert loaded.spec == f"hf:{tmp_path}" and loaded.fingerprint() == vptune.wrap_model(model).fingerprint()
    assert (loaded.mean, loaded.std, loaded.image_size) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 24)
    assert all(not p.requires_grad for p in loaded.parameters())
    x = pixels(loaded)
    torch.testing.assert_close(loaded(x), vptune.wrap_model(model)(x), rtol=0, atol=0)


def test_a_full_clip_checkpoint_loads_its_vision_tower(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel

    vision = {k: v for k, v in tiny_hf_model("clip").config.to_dict().items() if k in ("hidden_size", "patch_size")}
    config = CLIPConfig(
        vision_config={
            **vision,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "image_size": IMAGE,
        },
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    loaded = vptune.load_backbone(f"hf:{tmp_path}")
    assert loaded.family == "clip" and loaded.depth == 2 and loaded.mean == CLIP_MEAN


def test_short_name_resolves_under_vptune_weights(tmp_path, monkeypatch) -> None:
    tiny_hf_model("dinov2").save_pretrained(tmp_path / "dinov2-small-imgfocus")
    monkeypatch.setenv("VPTUNE_WEIGHTS", str(tmp_path))
    loaded = vptune.load_backbone("dinov2-small")
    assert loaded.spec == "dinov2-small" and loaded.family == "dinov2" and loaded.width == WIDTH
    assert loaded.mean == IMAGENET_MEAN and loaded.image_size == 224  # DINOv2's preprocessing, not its 518 config


def test_missing_hub_model_says_how_to_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match="VPTUNE_WEIGHTS"):
        vptune.load_backbone(f"hf:{tmp_path / 'absent'}")


@pytest.mark.parametrize("skip", [(1, 4), (1, None), (0, 2)])  # middle tokens; all but the class token; the first two
def test_a_block_skips_unread_outputs_and_computes_the_rest_unchanged(backbone: vptune.Backbone, skip) -> None:
    tokens = backbone.embed(pixels(backbone, 2))
    skip = (skip[0], skip[1] or tokens.shape[1])
    for index in range(DEPTH):
        with FlopCounterMode(display=False) as whole:
            every = backbone.run_block(index, tokens)
        with FlopCounterMode(display=False) as part:
            kept = backbone.run_block(index, tokens, skip)
        assert kept.shape == (2, tokens.shape[1] - (skip[1] - skip[0]), WIDTH)
        torch.testing.assert_close(kept, drop_tokens(every, skip), atol=1e-5, rtol=1e-4)  # fp32 summation order
        assert part.get_total_flops() < whole.get_total_flops()  # queries and MLP for the kept tokens only
        tokens = every


@pytest.mark.parametrize("context_batch", [1, 2])  # one set of prompts for the batch; one per sample
@pytest.mark.parametrize("skip", [None, (1, None)])
def test_context_tokens_act_as_inserted_tokens_whose_outputs_are_dropped(
    backbone: vptune.Backbone, context_batch: int, skip
) -> None:
    tokens = backbone.embed(pixels(backbone, 2))
    prefix, length = backbone.num_prefix_tokens, tokens.shape[1]
    context = torch.randn(context_batch, 3, WIDTH, generator=torch.Generator().manual_seed(1))
    inserted = torch.cat([tokens[:, :prefix], context.expand(2, -1, -1), tokens[:, prefix:]], dim=1)
    for index in range(DEPTH):
        every = drop_tokens(backbone.run_block(index, inserted), (prefix, prefix + 3))
        expected = drop_tokens(every, (1, length)) if skip else every
        got = backbone.run_block(index, tokens, (1, length) if skip else None, context)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        tokens = every
        inserted = torch.cat([tokens[:, :prefix], context.expand(2, -1, -1), tokens[:, prefix:]], dim=1)


def test_an_unknown_block_layout_runs_whole_and_drops_the_unread_outputs() -> None:
    class Block(nn.Module):  # post-norm: not the pre-norm layout the partial path assumes
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
            self.norm1 = nn.LayerNorm(WIDTH)

        def forward(self, tokens: torch.Tensor, mask=None) -> torch.Tensor:
            return self.norm1(tokens + self.attention(tokens, tokens, tokens)[0])

    backbone = tiny_backbone("dinov2")
    backbone.model.encoder.layer[0] = Block()
    tokens = torch.randn(2, 7, WIDTH)
    expected = backbone.model.encoder.layer[0](tokens)
    torch.testing.assert_close(backbone.run_block(0, tokens, (1, 3)), drop_tokens(expected, (1, 3)))
    context = torch.randn(1, 2, WIDTH)  # keys and values only: inserted, run whole, outputs dropped
    expected = backbone.model.encoder.layer[0](torch.cat([tokens, context.expand(2, -1, -1)], dim=1))[:, :7]
    torch.testing.assert_close(backbone.run_block(0, tokens, (1, 3), context), drop_tokens(expected, (1, 3)))


def test_quick_gelu_is_clips_activation_keeping_only_its_input() -> None:
    states = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.equal(quick_gelu(states), QuickGELUActivation()(states))
    assert torch.autograd.gradcheck(quick_gelu, (states,))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        quick_gelu(states)
    assert len(kept) == 1 and kept[0] is states
    # a wrapped CLIP model's MLPs run it (through their own forward, so that hooks on them still fire)
    assert all(isinstance(block.mlp.activation_fn, QuickGelu) for block in tiny_backbone("clip").blocks)
