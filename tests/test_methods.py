"""Every tuning method on tiny models of every family: what trains, what stays bit-identical, identity starts,
save -> load, parameter counts, optimiser defaults."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import DEPTH, IMAGE, WIDTH, pixels, tiny_backbone

import vptune
from vptune.bench import DEFAULT_METHODS
from vptune.engine import TrainConfig, make_optimizer
from vptune.methods import ADAMW_LR_GRID, METHODS, SGD_LR_GRID, WD_GRID, build, get_method, method_names
from vptune.report import params_multiple

CLASSES = 5


def mlp_width(family: str) -> int:
    """The tiny configs' MLP hidden size: ``intermediate_size`` = 2d, but DINOv2 configs use ``mlp_ratio`` (4)."""
    return 4 * WIDTH if family.startswith("dinov2") else 2 * WIDTH


ALL = (*DEFAULT_METHODS, "partial-2", "vpt-deep+bias")  # the paper's ten plus the extras
HEAD = {"head.weight", "head.bias"}


def last_blocks(name: str, k: int) -> bool:
    match = re.search(r"\.(?:layer|layers)\.(\d+)\.", name)
    return bool(match) and int(match[1]) >= DEPTH - k


def is_final_norm(name: str) -> bool:
    return name.startswith(("backbone.model.layernorm.", "backbone.model.post_layernorm."))


def expected_trainable(method: str, name: str) -> bool:
    """Which tensors each method trains, written out independently of the implementation."""
    if name in HEAD:
        return True
    rules = {
        "linear": lambda: False,
        "mlp-3": lambda: name.startswith("head."),
        "partial-1": lambda: last_blocks(name, 1) or is_final_norm(name),
        "partial-2": lambda: last_blocks(name, 2) or is_final_norm(name),
        "bias": lambda: name.startswith("backbone.") and name.endswith(".bias"),
        "adapter": lambda: ".adapter." in name,
        "sidetune": lambda: name.startswith("side.") or name == "blend",
        "lora": lambda: ".lora_" in name,
        "vpt-shallow": lambda: name.startswith("prompts."),
        "vpt-deep": lambda: name.startswith("prompts."),
        "vpt-deep+bias": lambda: (
            name.startswith("prompts.") or (name.startswith("backbone.") and name.endswith(".bias"))
        ),
        "full": lambda: name.startswith("backbone.") and not name.endswith("mask_token"),
    }
    return rules[method]()


def make(method: str, backbone: vptune.Backbone, seed: int = 0, **options) -> vptune.TaskModel:
    return build(method, backbone, CLASSES, image_size=IMAGE, seed=seed, **options)


def sgd_steps(model: vptune.TaskModel, steps: int, lr: float = 0.5) -> list[dict[str, torch.Tensor]]:
    """Plain SGD steps on a random batch; returns every trainable tensor's gradient at each step."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, labels = pixels(model.backbone, batch=6, seed=3), torch.arange(6) % CLASSES
    x = x.to(next(model.parameters()).dtype)
    torch.manual_seed(0)
    model.train()
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
    return grads


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("method", ALL)
def test_exactly_the_intended_tensors_train(backbone: vptune.Backbone, method: str) -> None:
    shared_before = snapshot(backbone)
    model = make(method, backbone)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if expected_trainable(method, n)}
    assert trainable == expected
    before = snapshot(model)
    grads = sgd_steps(model, steps=2)
    # at the second step every trainable tensor has a non-zero gradient (adapter/LoRA down/A need a step first)
    assert set(grads[1]) == trainable
    assert all(grads[1][n].abs().sum() > 0 for n in trainable), [n for n in trainable if not grads[1][n].any()]
    after = snapshot(model)
    statistics = {n for n, _ in model.named_buffers() if ".running_" in n or "num_batches" in n}  # BatchNorm's
    frozen = {n for n in before if n not in trainable and n not in statistics}
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trainable)
    # the shared backbone it was built from is never touched, whatever the method trains
    assert all(torch.equal(t, backbone.state_dict()[n]) for n, t in shared_before.items())
    assert not any(p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_adapter_and_lora_start_as_the_identity_and_learn(backbone: vptune.Backbone, method: str) -> None:
    model, linear = make(method, backbone), make("linear", backbone)
    linear.head.load_state_dict(model.head.state_dict())
    x = pixels(backbone)
    assert torch.equal(model(x), linear(x))
    zero, random = ("up", "down") if method == "adapter" else ("lora_b", "lora_a")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(not start[n].any() for n in start if f"{zero}." in n or n.endswith(zero))
    sgd_steps(model, steps=1)
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])}
    assert any(zero in n for n in moved)  # the zero-initialised half learns at the first step
    assert not any(random in n for n in moved)  # its partner's gradient is zero while the other half is zero
    sgd_steps(model, steps=1)
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])}
    assert moved == set(start)  # and from the second step on, everything learns
    assert not torch.equal(model(x), linear(x))


@pytest.mark.parametrize("method", ALL)
def test_save_load_reproduces_logits(backbone: vptune.Backbone, method: str, tmp_path) -> None:
    model = make(method, backbone, seed=3)
    sgd_steps(model, steps=2)
    model.eval()
    x = pixels(backbone, seed=5)
    vptune.save_task(model, tmp_path / method)
    loaded = vptune.load_task(tmp_path / method, backbone=backbone)
    assert loaded.method == method
    assert torch.equal(loaded(x), model(x))
    stored = set(vptune.read_record(tmp_path / method)["tensors"])
    buffers = {n for n, _ in model.named_buffers() if not n.startswith("backbone.")}  # an MLP head's statistics
    assert stored == {n for n, p in model.named_parameters() if p.requires_grad} | buffers


def test_options_are_recorded_and_reloaded(tmp_path) -> None:
    backbone = tiny_backbone("dinov2")
    model = make("lora", backbone, rank=2, alpha=4.0, lora_targets="q,k,v,o")
    assert model.options == {"rank": 2, "alpha": 4.0, "lora_targets": "q,k,v,o"}
    vptune.save_task(model, tmp_path)
    assert vptune.load_task(tmp_path, backbone=backbone).options == model.options


def test_task_file_of_full_refuses_another_backbone(tmp_path) -> None:
    model = make("full", tiny_backbone("vit"))
    vptune.save_task(model, tmp_path)
    assert vptune.read_record(tmp_path)["backbone"]["fingerprint"] == tiny_backbone("vit").fingerprint()
    with pytest.raises(vptune.TaskFileError, match="fingerprint"):
        vptune.load_task(tmp_path, backbone=tiny_backbone("vit", seed=1))


def head_count(width: int = WIDTH) -> int:
    return width * CLASSES + CLASSES


def block_count(family: str) -> int:
    d, m = WIDTH, mlp_width(family)
    attention = 4 * (d * d + d)
    mlp = d * m + m + m * d + d
    norms = 2 * 2 * d
    layer_scale = 2 * d if family.startswith("dinov2") else 0
    return attention + mlp + norms + layer_scale


def bias_count(family: str) -> int:
    per_block = 4 * WIDTH + mlp_width(family) + WIDTH + 2 * WIDTH  # q,k,v,o + fc1 + fc2 + two LayerNorms
    extra = WIDTH + WIDTH  # the final norm; the patch embedding (CLIP's has no bias, but its pre-norm has one)
    return DEPTH * per_block + extra


@pytest.mark.parametrize(
    ("method", "options", "formula"),
    [
        ("linear", {}, lambda family: head_count()),
        ("mlp-1", {}, lambda family: head_count()),
        ("mlp-3", {}, lambda family: 2 * (WIDTH * WIDTH + WIDTH + 2 * WIDTH) + head_count()),  # + BatchNorm's affine
        ("partial-1", {}, lambda family: block_count(family) + 2 * WIDTH + head_count()),
        ("partial-3", {}, lambda family: 3 * block_count(family) + 2 * WIDTH + head_count()),
        ("bias", {}, lambda family: bias_count(family) + head_count()),
        ("adapter", {}, lambda family: DEPTH * (2 * WIDTH * (WIDTH // 8) + WIDTH // 8 + WIDTH) + head_count()),
        ("adapter", {"reduction": 2}, lambda family: DEPTH * (2 * WIDTH * 16 + 16 + WIDTH) + head_count()),
        ("lora", {}, lambda family: DEPTH * 2 * 8 * (WIDTH + WIDTH) + head_count()),
        ("lora", {"rank": 2, "lora_targets": "q,k,v,o"}, lambda family: DEPTH * 4 * 2 * 2 * WIDTH + head_count()),
        (
            "sidetune",
            {"side_width": 4, "side_depth": 2},
            lambda family: (3 * 4 * 9 + 4) + (4 * 8 * 9 + 8) + (8 * WIDTH + WIDTH) + 1 + head_count(),
        ),
        ("vpt-deep+bias", {}, lambda family: DEPTH * 10 * WIDTH + bias_count(family) + head_count()),
    ],
)
def test_parameter_counts_match_formulas(family: str, method: str, options: dict, formula) -> None:
    backbone = tiny_backbone(family)
    assert make(method, backbone, **options).num_trainable() == formula(family)


def test_full_trains_the_whole_backbone_and_counts_like_the_paper(family: str, tmp_path) -> None:
    backbone = tiny_backbone(family)
    model = make("full", backbone)
    unused = sum(p.numel() for n, p in backbone.named_parameters() if n.endswith("mask_token"))
    assert model.num_trainable() == backbone.num_parameters() - unused + head_count()
    vptune.save_task(model, tmp_path)
    record = vptune.read_record(tmp_path)
    # (shared frozen part + T * per task) / backbone: full stores the whole backbone per task, ~T x (paper: 24.02x)
    expected = (unused + 24 * model.num_trainable()) / backbone.num_parameters()
    assert params_multiple(record, 24) == pytest.approx(expected)
    assert params_multiple(record, 24) > 24
    linear = make("linear", backbone)
    vptune.save_task(linear, tmp_path / "linear")
    assert params_multiple(vptune.read_record(tmp_path / "linear"), 24) == pytest.approx(
        1 + 24 * head_count() / backbone.num_parameters()
    )


def test_method_names_and_errors() -> None:
    assert {"linear", "mlp-<k>", "partial-<k>", "full", "adapter", "lora", "sidetune", "bias"} <= set(method_names())
    assert get_method("mlp-3") == (METHODS["mlp-<k>"], 3)
    backbone = tiny_backbone("vit")
    with pytest.raises(ValueError, match="unknown method 'mlp-0'"):
        make("mlp-0", backbone)
    with pytest.raises(ValueError, match="has only 3 blocks"):
        make("partial-4", backbone)
    with pytest.raises(ValueError, match=r"does not take options \['reduction'\]; it takes: rank, alpha"):
        make("lora", backbone, reduction=4)
    with pytest.raises(ValueError, match="lora_targets"):
        make("lora", backbone, lora_targets="q,x")
    with pytest.raises(ValueError, match="reduction"):
        make("adapter", backbone, reduction=64)


def test_method_defaults_follow_the_paper() -> None:
    assert METHODS["full"].optimizer == "adamw" and METHODS["full"].lr_grid == ADAMW_LR_GRID
    assert METHODS["vpt-deep"].optimizer == "sgd" and METHODS["vpt-deep"].lr_grid == SGD_LR_GRID
    assert len(SGD_LR_GRID) == 10 and WD_GRID == (0.01, 0.001, 0.0001, 0.0)
    config = TrainConfig().for_method("full")
    assert (config.optimizer, config.base_lr) == ("adamw", METHODS["full"].base_lr)
    assert TrainConfig(base_lr=0.003, optimizer="sgd").for_method("full").base_lr == 0.003
    assert TrainConfig().for_method("mlp-2").optimizer == "sgd"


def test_adamw_applies_weight_decay() -> None:
    """The released code's AdamW path ignored the weight-decay grid; ours decays (decoupled) every weight."""
    model = build("full", tiny_backbone("vit"), CLASSES, image_size=IMAGE)
    optimizer = make_optimizer(model, TrainConfig(base_lr=256.0, batch_size=1, weight_decay=0.1, optimizer="adamw"))
    assert isinstance(optimizer, torch.optim.AdamW)
    param = model.head.weight
    before = param.detach().clone()
    for each in model.parameters():
        each.grad = torch.zeros_like(each) if each.requires_grad else None
    optimizer.step()
    torch.testing.assert_close(param.detach(), 0.9 * before)


def test_sidetune_blend_starts_at_one_half(backbone: vptune.Backbone) -> None:
    model = make("sidetune", backbone)
    x = pixels(backbone)
    linear = make("linear", backbone)
    expected = 0.5 * linear.forward_features(x) + 0.5 * model.side(x)
    assert torch.allclose(model.forward_features(x), expected)


@pytest.mark.parametrize("method", ALL)
def test_skipping_unread_outputs_trains_every_method_alike(backbone: vptune.Backbone, method: str) -> None:
    plain, skipping = make(method, backbone).double(), make(method, backbone).double()  # float64: no rounding trace
    plain.skip_unread = False  # every token of every block computed: the reference
    for step, (expected, got) in enumerate(zip(sgd_steps(plain, 2), sgd_steps(skipping, 2), strict=True)):
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=f"step {step}: {name}")
