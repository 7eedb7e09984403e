"""The ``timm:`` adapter against real timm (random weights: nothing is downloaded).

Runs only where timm imports: timm needs torchvision, which the CPU test environment must not get; on a CUDA
machine ``benchmarks/gpu.sh`` installs timm and runs this file. tests/test_timm_fake.py checks the same adapter on
any machine against a stand-in with timm's layout.
"""

from __future__ import annotations

import pytest

timm = pytest.importorskip(
    "timm",
    reason="timm is not installed: pip install timm where torchvision works (e.g. a CUDA machine; "
    "benchmarks/gpu.sh does it); tests/test_timm_fake.py covers the adapter without it",
)

import timm_checks as checks  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import vptune  # noqa: E402
from vptune.backbones import TimmViTBackbone, load_backbone  # noqa: E402

NAME = "vit_tiny_patch16_224"
SMALL = dict(img_size=64)  # 16 patches: the method checks stay quick on a CPU
VARIANTS = {
    "plain": {},
    "registers": dict(reg_tokens=2, no_embed_class=True, init_values=0.1, pre_norm=True),
    "avg": dict(global_pool="avg"),
    "qk-norm": dict(qk_norm=True, init_values=0.1),
}


def timm_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, num_classes=0, **kwargs).eval()
    with torch.no_grad():  # timm starts biases and LayerScale small or zero: random ones make a dropped one show
        for name, param in model.named_parameters():
            if name.endswith("bias") or name.endswith("gamma"):
                param.normal_(0.0, 0.1)
    return model


def timm_backbone(seed: int = 0, **kwargs) -> TimmViTBackbone:
    return vptune.wrap_model(timm_model(seed, **kwargs), spec=f"timm:{NAME}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_features_equal_timms_forward_head(variant: str) -> None:
    backbone = timm_backbone(**VARIANTS[variant], **SMALL)
    assert isinstance(backbone, TimmViTBackbone)
    assert (backbone.width, backbone.depth, backbone.patch_size, backbone.image_size) == (192, 12, 16, 64)
    x = checks.pixels(backbone, 3)
    with torch.no_grad():
        own = backbone.model.forward_features(x)
        expected = backbone.model.forward_head(own, pre_logits=True)
        if not backbone.pool_before_norm:
            torch.testing.assert_close(backbone(x), own, atol=1e-5, rtol=1e-5)
        for method in ("linear", "partial-1"):
            features = checks.make(method, backbone).eval().forward_features(x)
            torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_native_224_and_other_sizes_as_timm_resamples_positions() -> None:
    backbone = timm_backbone()
    assert backbone.image_size == 224
    dynamic = timm_model(dynamic_img_size=True)  # positions resampled by timm for any grid
    dynamic.load_state_dict(backbone.model.state_dict())
    for side in (224, 96):
        x = checks.pixels(backbone, 2, size=side)
        with torch.no_grad():
            expected = dynamic.forward_head(dynamic.forward_features(x), pre_logits=True)
            features = vptune.build("linear", backbone, 3, image_size=side).eval().forward_features(x)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_a_weights_file_loads_through_the_spec_and_rebuilds_task_files(tmp_path) -> None:
    random = timm_backbone(seed=4)
    weights = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in random.model.state_dict().items()}, str(weights))
    backbone = load_backbone(f"timm:{NAME}@{weights}")
    assert backbone.fingerprint() == random.fingerprint()
    assert (backbone.mean, backbone.image_size) == (tuple(random.model.pretrained_cfg["mean"]), 224)
    model = checks.make("vpt-deep", backbone).eval()
    vptune.save_task(model, tmp_path / "task")
    loaded = vptune.load_task(tmp_path / "task")  # the backbone rebuilt from the recorded spec
    x = checks.pixels(backbone, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("method", checks.METHODS)
def test_each_method_trains_what_it_should_and_reloads_exactly(method: str, tmp_path) -> None:
    checks.check_method(timm_backbone(**SMALL), method, tmp_path / method)


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_prompts_change_the_output(method: str) -> None:
    checks.check_prompts_change_the_output(timm_backbone(**VARIANTS["registers"], **SMALL), method)


def test_lora_on_q_k_or_v_is_refused_with_the_reason() -> None:
    checks.check_lora_refuses_fused_qkv(timm_backbone(**SMALL))


def test_multitask_serves_timm_tasks(tmp_path) -> None:
    checks.check_multitask(timm_backbone(**VARIANTS["registers"], **SMALL), tmp_path)


def test_fourier_and_token_prompts_work_and_key_value_prompts_are_refused(tmp_path) -> None:
    checks.check_designs(timm_backbone(**VARIANTS["registers"], **SMALL), tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vpt_deep_trains_on_the_gpu_in_bf16() -> None:
    backbone = timm_backbone().cuda()
    model = checks.make("vpt-deep", backbone).cuda().train()
    x, labels = checks.pixels(backbone, 4).cuda(), torch.arange(4, device="cuda") % checks.CLASSES
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
    loss.backward()
    assert torch.isfinite(loss) and model.prompts.embeddings.grad.abs().sum() > 0
