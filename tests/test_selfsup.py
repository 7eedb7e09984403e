"""Self-supervised ViTs: MAE (no masking, the released code's read-out) and MoCo-v3 checkpoints converted to ViTs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEPTH, IMAGE, PATCH, WIDTH, pixels, tiny_backbone, tiny_hf_model
from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

import vptune
from vptune.backbones import IMAGENET_MEAN, IMAGENET_STD, SHORT_NAMES, convert_mocov3
from vptune.cli import main
from vptune.prompts import PromptConfig

P = 3
PATCHES = (IMAGE // PATCH) ** 2


def _never(*args, **kwargs):
    raise AssertionError("ViTMAE's random masking ran")


# --- MAE ---------------------------------------------------------------------------------------------------------


def test_mae_embeds_every_patch_in_order_without_its_random_masking(monkeypatch) -> None:
    backbone = tiny_backbone("mae")
    assert backbone.model.config.mask_ratio == 0.75  # configured as pretrained; vptune never applies it
    x = pixels(backbone, 2)
    embeddings = backbone.model.embeddings
    with torch.no_grad():
        # ViTMAE's own embedding, asked to keep every patch in order, is what vptune's embed computes
        backbone.model.config.mask_ratio = 0.0
        own, mask, _ = embeddings(x, noise=torch.arange(PATCHES, dtype=torch.float32).expand(2, -1))
        backbone.model.config.mask_ratio = 0.75
        assert not mask.any()
        monkeypatch.setattr(ViTMAEEmbeddings, "random_masking", _never)
        tokens = backbone.embed(x)
    assert tokens.shape == (2, 1 + PATCHES, WIDTH)
    torch.testing.assert_close(tokens, own, atol=0, rtol=0)
    # by hand: patches by the convolution plus the fixed positions; the class position is zero
    positions = embeddings.position_embeddings[0]
    assert not positions[0].any()
    patches = embeddings.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 1:], patches + positions[1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(tokens[:, 0], embeddings.cls_token[0].expand(2, -1), atol=0, rtol=0)


@pytest.mark.parametrize("method", ["linear", "vpt-shallow", "vpt-deep", "partial-1"])
def test_mae_logits_depend_on_the_sample_alone(method: str, monkeypatch) -> None:
    monkeypatch.setattr(ViTMAEEmbeddings, "random_masking", _never)
    model = vptune.build(method, tiny_backbone("mae"), 4, image_size=IMAGE, seed=1).eval()
    x = pixels(model.backbone, 5, seed=2)
    with torch.no_grad():
        torch.manual_seed(0)
        batch = model(x)
        torch.manual_seed(1)
        again = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(5)])
        others = model(torch.cat([x[:1], pixels(model.backbone, 3, seed=9)]))[:1]  # one image among other images
    assert torch.equal(batch, again)
    torch.testing.assert_close(alone, batch, atol=1e-6, rtol=0)
    torch.testing.assert_close(others, batch[:1], atol=1e-6, rtol=0)


def last_block_output(model: vptune.TaskModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's features for ``x``, and its last block's output (every token)."""
    outputs = []
    handle = model.backbone.blocks[-1].register_forward_hook(lambda module, args, output: outputs.append(output))
    model.skip_unread = False  # the last block computes every token, so that the hook sees them all
    try:
        with torch.no_grad():
            features = model.forward_features(x)
    finally:
        handle.remove()
    return features, outputs[0]


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep", "linear"])
def test_mae_reads_out_as_the_released_code(method: str) -> None:
    """Default: the mean of every output but the class token (prompts included), through a LayerNorm with weight 1,
    bias 0 and eps 1e-6 (the released code's fresh ``fc_norm``; the pretrained final norm is not used)."""
    backbone = tiny_backbone("mae")
    prompt = PromptConfig(num_tokens=P, deep=method == "vpt-deep") if method != "linear" else None
    model = vptune.build(method, backbone, 4, prompt, image_size=IMAGE).eval()
    assert model.prompt_config.readout == "all"
    features, last = last_block_output(model, pixels(backbone, 2))
    tokens = 1 + (P if method != "linear" else 0) + PATCHES
    assert last.shape == (2, tokens, WIDTH)
    expected = F.layer_norm(last[:, 1:].mean(1), (WIDTH,), eps=1e-6)
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("readout", "pool"),
    [
        ("cls", lambda t: t[:, 0]),
        ("image", lambda t: t[:, 1 + P :].mean(1)),
        ("prompt", lambda t: t[:, 1 : 1 + P].mean(1)),
    ],
)
def test_mae_other_readouts_pool_then_norm(readout: str, pool) -> None:
    backbone = tiny_backbone("mae")
    model = vptune.build("vpt-deep", backbone, 4, PromptConfig(num_tokens=P, readout=readout), image_size=IMAGE)
    features, last = last_block_output(model.eval(), pixels(backbone, 2))
    torch.testing.assert_close(features, F.layer_norm(pool(last), (WIDTH,), eps=1e-6), atol=1e-6, rtol=0)


def test_other_families_keep_the_class_token_by_default() -> None:
    assert vptune.build("vpt-deep", tiny_backbone("vit"), 4, image_size=IMAGE).prompt_config.readout == "cls"
    assert vptune.build("linear", tiny_backbone("vit"), 4, image_size=IMAGE).prompt_config.readout == "cls"


def test_fc_norm_replaces_the_pretrained_norm_and_trains_where_the_final_norm_does(tmp_path) -> None:
    backbone = tiny_backbone("mae")
    norm = backbone.model.layernorm
    assert backbone.norm is norm and norm.eps == 1e-6
    assert torch.equal(norm.weight, torch.ones(WIDTH)) and torch.equal(norm.bias, torch.zeros(WIDTH))
    assert not norm.weight.requires_grad
    assert "backbone.model.layernorm.weight" not in vptune.build("vpt-deep", backbone, 3).trainable_state_dict()
    model = vptune.build("partial-1", backbone, 3, image_size=IMAGE).train()
    assert {"backbone.model.layernorm.weight", "backbone.model.layernorm.bias"} <= set(model.trainable_state_dict())
    x, labels = pixels(backbone, 6, seed=4), torch.arange(6) % 3
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    trained = model.backbone.model.layernorm
    assert not torch.equal(trained.weight, torch.ones(WIDTH))  # a trained tensor of the task ...
    assert torch.equal(norm.weight, torch.ones(WIDTH))  # ... the shared backbone's untouched
    vptune.save_task(model.eval(), tmp_path)
    assert "backbone.model.layernorm.weight" in vptune.read_record(tmp_path)["tensors"]
    loaded = vptune.load_task(tmp_path, backbone=backbone)
    assert torch.equal(loaded(x), model(x))


def test_a_saved_mae_folder_loads_and_trains_from_the_cli(tmp_path, tiny_task) -> None:
    folder = tmp_path / "tiny-mae"
    hf = tiny_hf_model("mae")
    hf.save_pretrained(folder)
    backbone = vptune.load_backbone(f"hf:{folder}")
    assert (backbone.family, backbone.mean, backbone.std) == ("mae", IMAGENET_MEAN, IMAGENET_STD)
    assert backbone.fingerprint() == vptune.wrap_model(hf).fingerprint()
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_task), "--backbone", f"hf:{folder}", "--image-size", "16", "--out", str(out)]
    argv += ["--method", "vpt-deep", "--num-tokens", "2", "--epochs", "1", "--batch-size", "8", "--no-progress"]
    assert main(argv) == 0
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["prompt"]["readout"] == "all"
    loaded = vptune.load_task(out)
    assert loaded.backbone.family == "mae" and loaded.prompt_config.readout == "all"


def test_mae_base_short_name(tmp_path, monkeypatch) -> None:
    assert SHORT_NAMES["mae-base"] == ("vit-mae-base", "facebook/vit-mae-base")
    tiny_hf_model("mae").save_pretrained(tmp_path / "vit-mae-base")
    monkeypatch.setenv("VPTUNE_WEIGHTS", str(tmp_path))
    loaded = vptune.load_backbone("mae-base")
    assert loaded.spec == "mae-base" and loaded.family == "mae" and loaded.depth == DEPTH


# --- MoCo-v3 -----------------------------------------------------------------------------------------------------

HEADS = 2


def timm_vit(seed: int, depth: int = 2) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes of a timm ViT (MoCo v3's encoders), width 32, patch 4, 16 px."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    d, m = WIDTH, 2 * WIDTH
    weights = {
        "cls_token": rand(1, 1, d),
        "pos_embed": torch.cat([torch.zeros(1, 1, d), rand(1, PATCHES, d)], dim=1),  # MoCo v3: zero class position
        "patch_embed.proj.weight": rand(d, 3, PATCH, PATCH),
        "patch_embed.proj.bias": rand(d),
        "norm.weight": 1 + rand(d),
        "norm.bias": rand(d),
    }
    for i in range(depth):
        shapes = {"norm1": (d,), "attn.qkv": (3 * d, d), "attn.proj": (d, d), "norm2": (d,)}
        shapes |= {"mlp.fc1": (m, d), "mlp.fc2": (d, m)}
        for name, shape in shapes.items():
            weights[f"blocks.{i}.{name}.weight"] = (1 + rand(d)) if name.startswith("norm") else rand(*shape)
            weights[f"blocks.{i}.{name}.bias"] = rand(shape[0])
    return weights


def timm_forward(w: dict[str, torch.Tensor], x: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """timm's ViT forward written out: every token after the final norm (MoCo v3's norms use eps 1e-6)."""
    depth = 1 + max(int(name.split(".")[1]) for name in w if name.startswith("blocks."))
    tokens = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=PATCH)
    tokens = torch.cat([w["cls_token"].expand(len(x), -1, -1), tokens.flatten(2).transpose(1, 2)], 1) + w["pos_embed"]
    batch, length, width = tokens.shape
    for i in range(depth):

        def part(name: str, i: int = i) -> tuple[torch.Tensor, torch.Tensor]:
            return w[f"blocks.{i}.{name}.weight"], w[f"blocks.{i}.{name}.bias"]

        normed = F.layer_norm(tokens, (width,), *part("norm1"), eps=1e-6)
        qkv = F.linear(normed, *part("attn.qkv")).reshape(batch, length, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = (q @ k.transpose(-2, -1) / (width // heads) ** 0.5).softmax(-1) @ v
        tokens = tokens + F.linear(attended.transpose(1, 2).reshape(batch, length, width), *part("attn.proj"))
        hidden = F.gelu(F.linear(F.layer_norm(tokens, (width,), *part("norm2"), eps=1e-6), *part("mlp.fc1")))
        tokens = tokens + F.linear(hidden, *part("mlp.fc2"))
    return F.layer_norm(tokens, (width,), w["norm.weight"], w["norm.bias"], eps=1e-6)


def pretraining_checkpoint(path: Path) -> tuple[dict, dict]:
    """A MoCo v3 pretraining checkpoint's layout: both encoders (with projection heads), the predictor, more."""
    base, momentum = timm_vit(0), timm_vit(1)
    state = {f"module.base_encoder.{k}": v for k, v in base.items()}
    state |= {f"module.momentum_encoder.{k}": v for k, v in momentum.items()}
    for encoder in ("base", "momentum"):
        state[f"module.{encoder}_encoder.head.0.weight"] = torch.randn(8, WIDTH)
    state["module.predictor.0.weight"] = torch.randn(8, 8)
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": {"state": {}}}, path)
    return base, momentum


@pytest.mark.parametrize("encoder", ["base", "momentum"])
def test_mocov3_checkpoint_converts_to_a_vit_with_the_same_outputs(tmp_path, encoder: str) -> None:
    weights = dict(zip(("base", "momentum"), pretraining_checkpoint(tmp_path / "moco.pth.tar"), strict=True))
    out = convert_mocov3(tmp_path / "moco.pth.tar", tmp_path / "converted", encoder=encoder, heads=HEADS)
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    backbone = vptune.load_backbone(f"hf:{out}")
    assert (backbone.family, backbone.width, backbone.depth, backbone.patch_size) == ("vit", WIDTH, 2, PATCH)
    assert (backbone.mean, backbone.std, backbone.image_size) == (IMAGENET_MEAN, IMAGENET_STD, IMAGE)
    x = pixels(backbone, 3)
    with torch.no_grad():
        expected = timm_forward(weights[encoder], x)
        torch.testing.assert_close(backbone(x), expected, atol=1e-5, rtol=1e-5)
        model = vptune.build("linear", backbone, 4, image_size=IMAGE).eval()
        assert model.prompt_config.readout == "cls"  # the class token after the final norm
        torch.testing.assert_close(model.forward_features(x), expected[:, 0], atol=1e-5, rtol=1e-5)


def test_a_linear_probing_checkpoint_and_the_cli(tmp_path, capsys) -> None:
    """main_lincls.py's checkpoints hold the encoder under ``module.`` with a linear ``head``: it is left out."""
    weights = timm_vit(2, depth=1)
    state = {f"module.{k}": v for k, v in weights.items()} | {"module.head.weight": torch.randn(10, WIDTH)}
    torch.save({"state_dict": state, "best_acc1": torch.tensor(76.7)}, tmp_path / "linear.pth.tar")
    out = tmp_path / "converted"
    assert main(["convert-mocov3", str(tmp_path / "linear.pth.tar"), str(out), "--heads", "4"]) == 0
    assert f"hf:{out}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 4
    backbone = vptune.load_backbone(f"hf:{out}")
    x = pixels(backbone, 2)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), timm_forward(weights, x, heads=4), atol=1e-5, rtol=1e-5)
    assert main(["convert-mocov3", str(tmp_path / "linear.pth.tar"), str(out), "--encoder", "momentum"]) == 1
    assert "one encoder" in capsys.readouterr().err


def test_default_heads_are_moco_v3s(tmp_path) -> None:
    """MoCo v3's ViT-S (width 384) and ViT-B (768) both have 12 heads; other widths need the count given."""
    weights = timm_vit(3, depth=1)
    torch.save({"model": weights}, tmp_path / "deit.pth")  # convert_to_deit.py's layout
    with pytest.raises(ValueError, match="no default head count for width 32"):
        convert_mocov3(tmp_path / "deit.pth", tmp_path / "out")
    with pytest.raises(ValueError, match="3 attention heads do not divide the width 32"):
        convert_mocov3(tmp_path / "deit.pth", tmp_path / "out", heads=3)
    from vptune.backbones.mocov3 import HEADS as DEFAULTS

    assert DEFAULTS[384] == DEFAULTS[768] == 12


def save(path: Path, data) -> Path:
    torch.save(data, path)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "absent.pth.tar", "no checkpoint file"),
        (lambda tmp: (tmp / "notes.txt").write_text("hello") and tmp / "notes.txt", "cannot read .* as a PyTorch"),
        (lambda tmp: save(tmp / "a.pth", {"args": argparse.Namespace(lr=1)}), "does not unpickle"),
        (lambda tmp: save(tmp / "b.pth", [torch.zeros(1)]), "holds a list"),
        (
            lambda tmp: save(tmp / "resnet.pth", {"state_dict": {"module.base_encoder.conv1.weight": torch.zeros(1)}}),
            "not a MoCo-v3 ViT checkpoint \\(a ResNet",
        ),
        (
            lambda tmp: save(tmp / "scaled.pth", {"model": timm_vit(4, 1) | {"blocks.0.ls1.gamma": torch.ones(WIDTH)}}),
            "does not have: blocks.0.ls1.gamma",
        ),
        (
            lambda tmp: save(tmp / "short.pth", {"model": {k: v for k, v in timm_vit(5, 1).items() if "fc2" not in k}}),
            "lacks blocks.0.mlp.fc2",
        ),
        (
            lambda tmp: save(tmp / "bad.pth", {"model": timm_vit(6, 1) | {"blocks.0.attn.proj.bias": torch.ones(8)}}),
            "not a consistent ViT",
        ),
    ],
    ids=["missing", "not-torch", "pickled-object", "not-a-dict", "resnet", "extra-tensor", "missing-tensor", "shapes"],
)
def test_files_that_are_not_mocov3_vits_are_refused_clearly(tmp_path, make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_mocov3(make(tmp_path), tmp_path / "out", heads=HEADS)
    assert not (tmp_path / "out").exists()


def test_wrapping_leaves_the_models_own_norm_in_place() -> None:
    hf = tiny_hf_model("mae")
    pretrained = hf.layernorm
    backbone = vptune.wrap_model(hf)
    assert hf.layernorm is pretrained and backbone.model.layernorm is not pretrained
    assert backbone.model.layers[0].mlp.fc1.weight is hf.layers[0].mlp.fc1.weight  # the same tensors, not copies
