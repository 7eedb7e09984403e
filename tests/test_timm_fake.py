"""The ``timm:`` adapter on this machine, without timm: a fake ``timm`` module is put in ``sys.modules``.

The fake stands in for timm's ``VisionTransformer`` layout (``patch_embed.proj``, ``cls_token``, ``reg_token``,
``pos_embed``, ``no_embed_class``, ``pos_drop``, ``norm_pre``, blocks with ``norm1``, a fused ``attn.qkv``,
``attn.proj``, ``ls1``, ``norm2``, ``mlp.fc1/fc2``, ``ls2``, then ``norm``, ``fc_norm``, ``global_pool``) and its
``forward_features`` / ``forward_head``, written out plainly here. It checks the adapter's mapping, lazy import, spec
parsing, fingerprint and task files; tests/test_timm.py runs the same checks against real timm where timm installs.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import timm_checks as checks
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import vptune
from vptune.backbones import TimmViTBackbone, load_backbone
from vptune.backbones.timm_vit import INSTALL_HINT, parse_spec
from vptune.cli import main
from vptune.perf import default_rows, rows

WIDTH, DEPTH, HEADS, PATCH, IMAGE = 32, 3, 2, 4, 16


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, length, dim))


class LayerScale(nn.Module):
    def __init__(self, dim: int, value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, init_values: float | None):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, side: int, patch: int, dim: int):
        super().__init__()
        self.img_size, self.patch_size, self.grid_size = (side, side), (patch, patch), (side // patch, side // patch)
        self.proj, self.norm = nn.Conv2d(3, dim, patch, patch), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class VisionTransformer(nn.Module):
    """timm's ViT as its ``forward_features`` and ``forward_head(pre_logits=True)`` compute it (no head)."""

    def __init__(self, reg_tokens=0, no_embed_class=False, init_values=None, pre_norm=False, global_pool="token"):
        super().__init__()
        self.embed_dim, self.global_pool, self.no_embed_class = WIDTH, global_pool, no_embed_class
        self.num_prefix_tokens, self.attn_pool = 1 + reg_tokens, None
        self.patch_embed = PatchEmbed(IMAGE, PATCH, WIDTH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, WIDTH))
        self.reg_token = nn.Parameter(torch.randn(1, reg_tokens, WIDTH)) if reg_tokens else None
        patches = (IMAGE // PATCH) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, patches + (0 if no_embed_class else 1 + reg_tokens), WIDTH))
        self.pos_drop = nn.Dropout(0.5)  # shows if the backbone were left in training mode
        self.norm_pre = nn.LayerNorm(WIDTH) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[Block(WIDTH, HEADS, init_values) for _ in range(DEPTH)])
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(WIDTH)
        self.fc_norm = nn.LayerNorm(WIDTH) if use_fc_norm else nn.Identity()
        self.head = nn.Identity()
        self.pretrained_cfg = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4), "input_size": (3, IMAGE, IMAGE)}
        with torch.no_grad():  # random affine norms and biases, so that a dropped one would show
            for name, param in self.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    param.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat([*prefix, x + self.pos_embed], 1) if self.no_embed_class else torch.cat([*prefix, x], 1)
        x = x if self.no_embed_class else x + self.pos_embed
        return self.norm(self.blocks(self.norm_pre(self.pos_drop(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens :].mean(1)
        return self.head(self.fc_norm(x)) if not pre_logits else self.fc_norm(x)


VARIANTS = {
    "vit_fake": {},
    "vit_fake_reg": dict(reg_tokens=2, no_embed_class=True, init_values=0.5, pre_norm=True),
    "vit_fake_avg": dict(global_pool="avg"),
}
SEEDS = {False: 0, True: 1}  # random weights, or the fake's "pretrained" ones


@pytest.fixture
def fake_timm(monkeypatch) -> list[dict]:
    """A ``timm`` module whose ``create_model`` builds the fake ViT; returns the calls it got."""
    calls = []

    def create_model(name: str, pretrained: bool = False, num_classes: int = 1000) -> nn.Module:
        calls.append({"name": name, "pretrained": pretrained, "num_classes": num_classes})
        if name == "vit_offline":
            raise OSError("no connection to the Hugging Face Hub")
        if name not in VARIANTS:
            raise RuntimeError(f"Unknown model ({name})")
        torch.manual_seed(SEEDS[pretrained])
        return VisionTransformer(**VARIANTS[name]).eval()

    module = types.ModuleType("timm")
    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", module)
    return calls


def fake_backbone(name: str = "vit_fake", seed: int = 0) -> TimmViTBackbone:
    torch.manual_seed(seed)
    return vptune.wrap_model(VisionTransformer(**VARIANTS[name]).eval(), spec=f"timm:{name}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_features_equal_timms_own_read_out(name: str) -> None:
    backbone = fake_backbone(name)
    assert isinstance(backbone, TimmViTBackbone)
    assert (backbone.width, backbone.depth, backbone.patch_size, backbone.image_size) == (WIDTH, DEPTH, PATCH, IMAGE)
    assert backbone.num_prefix_tokens == backbone.model.num_prefix_tokens
    x = checks.pixels(backbone, 3)
    with torch.no_grad():
        own = backbone.model.forward_features(x)
        if not backbone.pool_before_norm:  # every token after the final norm (avg: fc_norm comes after pooling)
            torch.testing.assert_close(backbone(x), own, atol=1e-5, rtol=0)
        for method in ("linear", "partial-1"):  # the last block whole, or only the read tokens' outputs
            model = checks.make(method, backbone).eval()
            expected = backbone.model.forward_head(own, pre_logits=True)
            torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=0)


def test_spec_loads_through_timm_lazily_and_records_the_weights_file(fake_timm, tmp_path) -> None:
    pretrained = load_backbone("timm:vit_fake")
    assert fake_timm[-1] == {"name": "vit_fake", "pretrained": True, "num_classes": 0}
    assert (pretrained.family, pretrained.spec) == ("timm-vit", "timm:vit_fake")
    assert (pretrained.mean, pretrained.std) == ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))  # from its pretrained_cfg
    random = fake_backbone()  # seed 0: other weights
    assert random.fingerprint() != pretrained.fingerprint()
    weights = tmp_path / "vit.safetensors"
    save_file({**random.model.state_dict(), "head.weight": torch.zeros(5, WIDTH)}, str(weights))  # a head: left out
    loaded = load_backbone(f"timm:vit_fake@{weights}")
    assert fake_timm[-1]["pretrained"] is False
    assert loaded.spec == f"timm:vit_fake@{weights.resolve()}"
    assert loaded.fingerprint() == random.fingerprint()
    x = checks.pixels(loaded)
    torch.testing.assert_close(loaded(x), random(x), atol=0, rtol=0)


def test_a_task_file_rebuilds_its_timm_backbone_from_the_spec(fake_timm, tmp_path) -> None:
    weights = tmp_path / "vit.pt"
    torch.save({"state_dict": fake_backbone(seed=3).model.state_dict()}, weights)
    backbone = load_backbone(f"timm:vit_fake@{weights}")
    model = checks.make("vpt-deep", backbone).eval()
    vptune.save_task(model, tmp_path / "task")
    loaded = vptune.load_task(tmp_path / "task")  # no backbone given: rebuilt from the recorded spec
    assert loaded.backbone.fingerprint() == backbone.fingerprint()
    x = checks.pixels(backbone)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("timm:", "empty timm model name"),
        ("timm:vit_fake@weights.ckpt", "must be one of .safetensors"),
        ("timm:vit_fake@/nowhere/vit.safetensors", "no weights file at"),
        ("timm:vit_nothing", r"cannot build timm model 'vit_nothing': Unknown model"),
        ("timm:vit_offline", r"no connection.*timm:vit_offline@<file.safetensors>"),
    ],
)
def test_bad_specs_say_what_is_wrong(fake_timm, spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_backbone(spec)


def test_a_file_of_another_model_or_of_pickled_objects_is_refused(fake_timm, tmp_path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"blocks.0.norm1.weight": torch.ones(WIDTH)}, str(other))
    with pytest.raises(ValueError, match="does not fit the timm model"):
        load_backbone(f"timm:vit_fake@{other}")
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "config": types.SimpleNamespace(depth=3)}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        load_backbone(f"timm:vit_fake@{pickled}")


def test_without_timm_the_error_says_how_to_get_it(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ValueError, match="needs the timm package.*pip install timm.*torchvision"):
        load_backbone("timm:vit_tiny_patch16_224")
    assert "CUDA machine" in INSTALL_HINT
    assert parse_spec("timm:vit_tiny_patch16_224") == ("vit_tiny_patch16_224", None)


def test_unsupported_layouts_are_refused() -> None:
    model = VisionTransformer()
    model.global_pool = "map"
    model.patch_embed.norm = nn.LayerNorm(WIDTH)
    with pytest.raises(ValueError, match=r"global_pool is 'map'.*patch embedding has a norm"):
        vptune.wrap_model(model)


def test_avg_pool_reads_out_the_patch_mean_through_fc_norm() -> None:
    backbone = fake_backbone("vit_fake_avg")
    model = checks.make("vpt-deep", backbone, prompt=vptune.PromptConfig(num_tokens=2)).eval()
    assert (model.prompt_config.readout, backbone.pool_before_norm, backbone.norm) == (
        "image",
        True,
        backbone.model.fc_norm,
    )


@pytest.mark.parametrize("method", checks.METHODS)
def test_each_method_trains_what_it_should_and_reloads_exactly(method: str, tmp_path) -> None:
    checks.check_method(fake_backbone(), method, tmp_path / method)


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_prompts_change_the_output(method: str) -> None:
    checks.check_prompts_change_the_output(fake_backbone("vit_fake_reg"), method)


def test_lora_on_q_k_or_v_is_refused_with_the_reason() -> None:
    checks.check_lora_refuses_fused_qkv(fake_backbone())


def test_multitask_serves_timm_tasks(tmp_path) -> None:
    checks.check_multitask(fake_backbone("vit_fake_reg"), tmp_path)


def test_prompted_forward_equals_a_written_out_reference() -> None:
    """VPT-Deep on the fake by hand: prompts after the prefix tokens, replaced before every block."""
    backbone = fake_backbone("vit_fake_reg")
    model = checks.make("vpt-deep", backbone, prompt=vptune.PromptConfig(num_tokens=2)).eval()
    vit, prefix = backbone.model, backbone.num_prefix_tokens
    x = checks.pixels(backbone)
    with torch.no_grad():
        patches = vit.patch_embed(x) + vit.pos_embed
        tokens = vit.norm_pre(torch.cat([vit.cls_token.expand(3, -1, -1), vit.reg_token.expand(3, -1, -1), patches], 1))
        for index, block in enumerate(vit.blocks):
            prompts = model.prompts.tokens(index, None, backbone, 3).expand(3, -1, -1)
            after = tokens[:, prefix + 2 :] if index else tokens[:, prefix:]  # block 1: inserted, then replaced
            tokens = block(torch.cat([tokens[:, :prefix], prompts, after], 1))
        expected = F.layer_norm(tokens, (WIDTH,), vit.norm.weight, vit.norm.bias)[:, 0]
        torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=0)


def test_the_performance_harness_rows_of_a_timm_spec_leave_lora_out() -> None:
    chosen = default_rows("timm:vit_base_patch16_224")  # nothing loaded: the spec says it is a ViT
    assert "lora" not in chosen and {"vpt-deep", "full", "adapter"} <= set(chosen)
    assert set(rows()) - set(chosen) == {"lora"}


def test_vptune_train_on_a_timm_spec(fake_timm, tmp_path, tiny_task) -> None:
    weights = tmp_path / "vit.safetensors"
    save_file(fake_backbone(seed=5).model.state_dict(), str(weights))
    out, spec = tmp_path / "run", f"timm:vit_fake@{weights}"
    argv = ["train", "--data", str(tiny_task), "--backbone", spec, "--image-size", "16", "--out", str(out)]
    argv += ["--method", "vpt-deep", "--num-tokens", "2", "--epochs", "1", "--batch-size", "8", "--no-progress"]
    assert main(argv) == 0
    record = json.loads((out / "vptune.json").read_text())
    assert record["backbone"]["spec"] == f"timm:vit_fake@{weights.resolve()}"
    assert record["backbone"]["family"] == "timm-vit"
    assert record["trainable_parameters"] == DEPTH * 2 * WIDTH + WIDTH * 3 + 3
    loaded = vptune.load_task(out)
    assert loaded.backbone.fingerprint() == record["backbone"]["fingerprint"]


def test_fourier_and_token_prompts_work_and_key_value_prompts_are_refused(tmp_path) -> None:
    checks.check_designs(fake_backbone(), tmp_path)
