"""Swin backbones with VPT: the wrapper is the model's own forward; prompts inside every window (against a reference
written here with plain loops), averaged over windows, merged as 4 copies, deep prompts per block at the stage's
width; every method that makes sense on Swin trains what it should, reloads exactly and serves."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import SwinConfig, SwinModel

import vptune
from vptune.backbones.swin import prompted_block
from vptune.cli import main
from vptune.multitask import MultiTask
from vptune.prompts import PromptConfig

CLASSES = 4
# 16 px, patch 2: an 8x8 grid in 2x2 windows (stage 1: 4x4), so every odd block shifts its windows.
SMALL = dict(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=2)
# 12 px, patch 2: 6x6 in 2x2 windows, then 3x3 padded to whole windows, an odd grid merged, a last 2x2 grid that
# is one unshifted window.
ODD = dict(image_size=12, patch_size=2, embed_dim=8, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=2)
DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, drop_path_rate=0.1)


def tiny_swin(seed: int = 0, **overrides) -> SwinModel:
    """A tiny random ``SwinModel``; weights spread wider than the default so attention mixes tokens, random biases,
    dropout everywhere (a backbone left in training mode would show)."""
    torch.manual_seed(seed)
    model = SwinModel(SwinConfig(**{**SMALL, **overrides}, **DROPOUT, initializer_range=0.2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "relative_position_bias_table" in name:
                param.normal_(0.0, 0.3)
    return model.eval()


def swin_backbone(seed: int = 0, **overrides) -> vptune.Backbone:
    return vptune.wrap_model(tiny_swin(seed, **overrides), spec="tiny-swin")


def pixels(batch: int = 3, size: int | tuple[int, int] = 16, seed: int = 0) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def make(method: str, backbone: vptune.Backbone, seed: int = 0, **kwargs) -> vptune.TaskModel:
    return vptune.build(method, backbone, CLASSES, image_size=backbone.image_size, seed=seed, **kwargs)


# --- the wrapper is the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("config", "size"), [(SMALL, 16), (ODD, 12), (SMALL, (16, 24))])
def test_without_prompts_the_wrapper_is_swinmodel_exactly(config: dict, size) -> None:
    model = tiny_swin(**config)
    backbone = vptune.wrap_model(model)
    x = pixels(size=size)
    with torch.no_grad():
        own = model(x)
        assert torch.equal(backbone(x), own.last_hidden_state)
        linear = make("linear", backbone)
        assert torch.equal(linear.forward_features(x), own.pooler_output)


def test_attributes_and_refusals() -> None:
    backbone = swin_backbone()
    assert (backbone.family, backbone.width, backbone.depth, backbone.num_prefix_tokens) == ("swin", 32, 4, 0)
    assert [backbone.block_width(i) for i in range(4)] == [16, 16, 32, 32]
    for prompt, message in [
        (PromptConfig(location="add"), "location 'add' is not available on Swin"),
        (PromptConfig(location="prepend-pixel"), "use location='prepend'"),
        (PromptConfig(project=8), "project is not available on Swin"),
        (PromptConfig(deep=True, shared=True), r"shared prompts need blocks of one width.*\[16, 16, 32, 32\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            make("vpt-deep" if prompt.deep else "vpt-shallow", backbone, prompt=prompt)
    with pytest.raises(ValueError, match="smaller than the window.*at least 8 pixels"):
        swin_backbone(image_size=4, patch_size=1, window_size=4)(pixels(size=4))


# --- the prompts' mechanics, against a reference written out with loops ----------------------------------------
def reference_block(block, grid: torch.Tensor, prompts: torch.Tensor | None, side: int, shift: int):
    """A Swin block with prompts, one sample and one window at a time; ``grid`` (B, H, W, C), prompts (B, p, C)."""
    batch, height, width, channels = grid.shape
    attention, num = block.attention, 0 if prompts is None else prompts.shape[1]
    heads = attention.num_attention_heads
    table = attention.relative_position_bias.relative_position_bias_table
    padded_h, padded_w = math.ceil(height / side) * side, math.ceil(width / side) * side
    canvas = grid.new_zeros(batch, padded_h, padded_w, channels)
    canvas[:, :height, :width] = block.layernorm_before(grid)
    canvas = torch.roll(canvas, (-shift, -shift), (1, 2))
    normed_prompts = None if prompts is None else block.layernorm_before(prompts)

    def region(y: int, x: int) -> tuple[int, int]:
        return tuple(int(v >= size - side) + int(v >= size - shift) for v, size in ((y, padded_h), (x, padded_w)))

    out = torch.zeros_like(canvas)
    prompt_sum = grid.new_zeros(batch, num, channels)
    windows = 0
    for b in range(batch):
        for top in range(0, padded_h, side):
            for left in range(0, padded_w, side):
                cells = [(top + i, left + j) for i in range(side) for j in range(side)]
                sequence = torch.stack([canvas[b, y, x] for y, x in cells])
                if prompts is not None:
                    sequence = torch.cat([normed_prompts[b], sequence])
                length = sequence.shape[0]
                q, k, v = (
                    getattr(attention, f"{r}_proj")(sequence).view(length, heads, -1).transpose(0, 1) for r in "qkv"
                )
                extra = torch.zeros(heads, length, length)
                for a, (ya, xa) in enumerate(cells):
                    for c, (yc, xc) in enumerate(cells):
                        extra[:, num + a, num + c] = table[(ya - yc + side - 1) * (2 * side - 1) + xa - xc + side - 1]
                        if shift and region(ya, xa) != region(yc, xc):
                            extra[:, num + a, num + c] -= 100.0
                probs = torch.softmax(q @ k.transpose(1, 2) * attention.scaling + extra, dim=-1)
                result = attention.o_proj((probs @ v).transpose(0, 1).reshape(length, channels))
                for a, (y, x) in enumerate(cells):
                    out[b, y, x] = result[num + a]
                prompt_sum[b] += result[:num]
                windows += b == 0
    out = torch.roll(out, (shift, shift), (1, 2))[:, :height, :width]
    grid = grid + out
    grid = grid + block.mlp(block.layernorm_after(grid))
    if prompts is None:
        return grid, None
    prompts = prompts + prompt_sum / windows
    return grid, prompts + block.mlp(block.layernorm_after(prompts))


def reference_merge(merging, grid: torch.Tensor, prompts: torch.Tensor | None):
    """Patch merging, one 2x2 neighbourhood at a time; the prompts as 4 copies of themselves."""
    batch, height, width, channels = grid.shape
    canvas = grid.new_zeros(batch, height + height % 2, width + width % 2, channels)
    canvas[:, :height, :width] = grid
    rows, cols = canvas.shape[1] // 2, canvas.shape[2] // 2
    merged = grid.new_zeros(batch, rows, cols, 4 * channels)
    for i in range(rows):
        for j in range(cols):
            parts = [canvas[:, 2 * i, 2 * j], canvas[:, 2 * i + 1, 2 * j], canvas[:, 2 * i, 2 * j + 1]]
            merged[:, i, j] = torch.cat([*parts, canvas[:, 2 * i + 1, 2 * j + 1]], dim=-1)
    merged = merging.reduction(merging.norm(merged))
    if prompts is None:
        return merged, None
    return merged, merging.reduction(merging.norm(torch.cat([prompts] * 4, dim=-1)))


def reference_features(model: SwinModel, x: torch.Tensor, fresh: dict[int, torch.Tensor]) -> torch.Tensor:
    """Pooled features of ``model`` with prompts ``fresh[block]`` (p, C) replacing the previous ones there."""
    tokens, (height, width) = model.embeddings(x)
    grid, prompts, index, side = tokens.view(x.shape[0], height, width, -1), None, 0, model.config.window_size
    for stage in model.encoder.layers:
        for j, block in enumerate(stage.blocks):
            if index in fresh:
                prompts = fresh[index].expand(x.shape[0], -1, -1)
            one_window = min(grid.shape[1:3]) == side
            grid, prompts = reference_block(block, grid, prompts, side, 0 if j % 2 == 0 or one_window else side // 2)
            index += 1
        if stage.downsample is not None:
            grid, prompts = reference_merge(stage.downsample, grid, prompts)
    tokens = grid.flatten(1, 2) if prompts is None else torch.cat([prompts, grid.flatten(1, 2)], dim=1)
    return model.layernorm(tokens).mean(dim=1)


@pytest.mark.parametrize("config", [SMALL, ODD])
@pytest.mark.parametrize("method", ["linear", "vpt-shallow", "vpt-deep"])
def test_prompted_forward_equals_the_written_out_reference(config: dict, method: str) -> None:
    model = tiny_swin(**config)
    backbone = vptune.wrap_model(model)
    task = make(method, backbone, prompt=PromptConfig(num_tokens=3, readout="all") if method != "linear" else None)
    task.eval()
    x = pixels(batch=2, size=config["image_size"], seed=1)
    layers = task.prompts.layers if task.prompts is not None else []
    fresh = {layer: task.prompts.select(layer, None)[0] for layer in layers}
    with torch.no_grad():
        torch.testing.assert_close(task.forward_features(x), reference_features(model, x, fresh), atol=1e-5, rtol=0)


def test_every_window_sees_the_prompts() -> None:
    """Changing one prompt changes every patch's attention output in that block, in both the plain and the shifted
    block, while the prompt-free block's windows never see each other."""
    backbone = swin_backbone()
    patches = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    prompts = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1))
    other = prompts.clone()
    other[0, 1] += torch.randn(16, generator=torch.Generator().manual_seed(2))  # (a constant would not survive norm1)
    for index, window in ((0, (2, 0)), (1, (2, 1))):
        block = backbone.blocks[index]
        with torch.no_grad():
            base, _ = prompted_block(block, patches, prompts, (8, 8), window)
            changed, _ = prompted_block(block, patches, other, (8, 8), window)
        assert ((base - changed).abs().amax(dim=-1) > 1e-6).all()  # every token of every window, every sample
    nudged = patches.clone()
    nudged[:, 0] += torch.randn(16)  # a token of the first (unshifted) window
    with torch.no_grad():
        moved = prompted_block(backbone.blocks[0], nudged, None, (8, 8), (2, 0))[0]
        still = prompted_block(backbone.blocks[0], patches, None, (8, 8), (2, 0))[0]
    assert torch.equal(moved.view(2, 8, 8, -1)[:, 2:], still.view(2, 8, 8, -1)[:, 2:])


def test_prompt_outputs_are_the_mean_over_windows() -> None:
    backbone = swin_backbone()
    grid = torch.randn(2, 8, 8, 16, generator=torch.Generator().manual_seed(0))
    prompts = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    for index, shift in ((0, 0), (1, 1)):
        block = backbone.blocks[index]
        with torch.no_grad():
            patches, out = prompted_block(block, grid.flatten(1, 2), prompts, (8, 8), (2, shift))
            want_patches, want = reference_block(block, grid, prompts, 2, shift)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(patches, want_patches.flatten(1, 2), atol=1e-5, rtol=0)


def test_patch_merging_gets_four_copies_of_the_prompts() -> None:
    backbone = swin_backbone()
    model = make("vpt-shallow", backbone, prompt=PromptConfig(num_tokens=3)).eval()
    seen = []
    merging = backbone.model.encoder.layers[0].downsample
    handle = merging.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(pixels(batch=2))
    handle.remove()
    (merged,) = seen
    assert merged.shape == (2, 3 + 16, 4 * 16)  # p prompts + (8/2)^2 patches, each at 4C
    copies = merged[:, :3].split(16, dim=-1)
    assert all(torch.equal(copy, copies[0]) for copy in copies[1:])
    assert not torch.equal(merged[:, 3:].split(16, dim=-1)[0], merged[:, 3:].split(16, dim=-1)[1])


def test_deep_prompts_one_set_per_block_at_its_stages_width() -> None:
    backbone = swin_backbone()
    model = make("vpt-deep", backbone, prompt=PromptConfig(num_tokens=5))
    shapes = [tuple(model.prompts.select(i, None).shape) for i in range(backbone.depth)]
    assert shapes == [(1, 5, 16), (1, 5, 16), (1, 5, 32), (1, 5, 32)]
    head = 32 * CLASSES + CLASSES
    assert model.num_trainable() == sum(d * 5 * w for d, w in zip([2, 2], [16, 32], strict=True)) + head
    shallow = make("vpt-shallow", backbone, prompt=PromptConfig(num_tokens=5))
    assert shallow.num_trainable() == 5 * 16 + head
    bound = math.sqrt(6 / (3 * 2 * 2 + 16))  # the released code draws every stage's prompts with C0's bound
    assert model.prompts.embeddings.abs().max() <= bound


def test_every_deep_blocks_prompts_reach_the_output() -> None:
    backbone = swin_backbone()
    model = make("vpt-deep", backbone, prompt=PromptConfig(num_tokens=2)).eval()
    x = pixels(batch=2)
    with torch.no_grad():
        base = model(x)
        for block in range(backbone.depth):
            width = sum(backbone.block_width(i) for i in range(block))
            model.prompts.embeddings[..., width] += 1.0
            assert not torch.equal(model(x), base)
            model.prompts.embeddings[..., width] -= 1.0


# --- every method ---------------------------------------------------------------------------------------------
def block_index(name: str) -> int | None:
    """The global block index of a ``...encoder.layers.<stage>.blocks.<j>...`` name (stages of 2 blocks)."""
    parts = name.split(".")
    if "blocks" not in parts:
        return None
    return 2 * int(parts[parts.index("layers") + 1]) + int(parts[parts.index("blocks") + 1])


def expected_trainable(method: str, name: str) -> bool:
    """Which tensors each method trains on Swin, written out independently of the implementation."""
    if name.startswith("head."):
        return True
    backbone = name.startswith("backbone.")
    index = block_index(name)
    rules = {
        "linear": False,
        "mlp-2": False,
        "partial-1": (index is not None and index >= 3) or name.startswith("backbone.model.layernorm."),
        "partial-3": (index is not None and index >= 1) or name.startswith("backbone.model.layernorm."),
        "bias": backbone and name.endswith(".bias"),
        "adapter": ".adapter." in name,
        "lora": ".lora_" in name,
        "vpt-shallow": name.startswith("prompts."),
        "vpt-deep": name.startswith("prompts."),
        "vpt-deep+bias": name.startswith("prompts.") or (backbone and name.endswith(".bias")),
        "sidetune": name.startswith("side.") or name == "blend",
        "full": backbone,
    }
    return rules[method]


METHODS = (
    "linear", "mlp-2", "partial-1", "partial-3", "bias", "adapter", "lora", "full", "vpt-shallow", "vpt-deep",
    "vpt-deep+bias", "sidetune",
)  # fmt: skip


def sgd_steps(model: vptune.TaskModel, steps: int = 2) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, labels = pixels(batch=6, seed=3), torch.arange(6) % CLASSES
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
    return grads


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_what_it_should_and_reloads_exactly(method: str, tmp_path) -> None:
    backbone = swin_backbone()
    shared = {n: t.clone() for n, t in backbone.state_dict().items()}
    model = make(method, backbone, seed=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if expected_trainable(method, n)}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    grads = sgd_steps(model)
    assert all(grads[n].abs().sum() > 0 for n in trainable), [n for n in trainable if not grads[n].any()]
    after = model.state_dict()
    statistics = {n for n in after if ".running_" in n or "num_batches" in n}
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable | statistics)
    # (a key bias adds the same q.b to every score of a query: its exact gradient is zero, only rounding moves it)
    assert all(not torch.equal(before[n], after[n]) for n in trainable if not n.endswith("k_proj.bias"))
    assert all(torch.equal(t, backbone.state_dict()[n]) for n, t in shared.items())  # the shared one: untouched

    model.eval()
    x = pixels(batch=4, seed=5)
    vptune.save_task(model, tmp_path / method)
    loaded = vptune.load_task(tmp_path / method, backbone=backbone)
    assert torch.equal(loaded(x), model(x))
    assert vptune.read_record(tmp_path / method)["backbone"]["fingerprint"] == backbone.fingerprint()
    # a sample's logits do not depend on the rest of its batch (nor on the batch's size)
    alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(model(x), alone, atol=1e-5, rtol=0)
    mixed = torch.cat([x[:1], pixels(batch=3, seed=9)])
    torch.testing.assert_close(model(mixed)[0], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep"])
def test_prompts_change_the_output(method: str) -> None:
    backbone = swin_backbone()
    model, linear = make(method, backbone).eval(), make("linear", backbone).eval()
    linear.head.load_state_dict(model.head.state_dict())
    x = pixels()
    with torch.no_grad():
        assert (model(x) - linear(x)).abs().max() > 1e-3
        model.prompts.embeddings.zero_()
        assert (model(x) - linear(x)).abs().max() > 1e-3  # zero prompts are still tokens in every window


def test_prompt_readouts_and_drop_after() -> None:
    backbone = swin_backbone()
    x = pixels()
    features = {}
    for readout in ("cls", "all", "image", "prompt"):
        model = make("vpt-deep", backbone, prompt=PromptConfig(num_tokens=2, readout=readout)).eval()
        with torch.no_grad():
            features[readout] = model.forward_features(x)
    assert torch.equal(features["cls"], features["all"])  # no class token: the pooled output of every token
    combined = (2 * features["prompt"] + 16 * features["image"]) / 18  # 2 prompts beside the last 4x4 grid
    torch.testing.assert_close(features["all"], combined, atol=1e-5, rtol=0)
    dropped = make("vpt-deep", backbone, prompt=PromptConfig(num_tokens=2, layers=[0, 1], drop_after=True)).eval()
    assert dropped.prompts.layers == [0, 1]
    with torch.no_grad():
        assert dropped.forward_features(x).shape == (3, 32)


def test_checkpointed_blocks_give_the_same_gradients() -> None:
    backbone = swin_backbone()
    model = make("vpt-deep", backbone, prompt=PromptConfig(num_tokens=2))
    x = pixels()
    model(x).sum().backward()
    plain = model.prompts.embeddings.grad.clone()
    model.zero_grad()
    with model.recomputing(backbone.depth):
        model(x).sum().backward()
    torch.testing.assert_close(model.prompts.embeddings.grad, plain, atol=1e-6, rtol=0)


def test_cached_trunk_continues_exactly() -> None:
    backbone = swin_backbone()
    x = pixels()
    for method in ("linear", "partial-1"):
        model = make(method, backbone).eval()
        point = model.cache_point()
        with torch.no_grad():
            torch.testing.assert_close(model(model.trunk(x, point), start=point), model(x), atol=1e-6, rtol=0)
    assert make("linear", backbone).cache_point() == backbone.depth + 1
    assert make("partial-1", backbone).cache_point() == backbone.depth - 1


def test_multitask_serves_swin_tasks_with_each_samples_own_prompts(tmp_path) -> None:
    backbone = swin_backbone()
    tasks = [make("vpt-deep", backbone, seed=s) for s in (0, 1)] + [
        make("vpt-shallow", backbone),
        make("linear", backbone),
    ]
    for index, task in enumerate(tasks):
        if task.prompts is not None:  # prompts far apart: a sample given another task's would show
            torch.nn.init.normal_(task.prompts.embeddings, 0.0, 0.5)
        vptune.save_task(task.eval(), tmp_path / f"t{index}")
    served = MultiTask(backbone, [tmp_path / f"t{i}" for i in range(4)])
    ids = torch.tensor([0, 1, 2, 3, 1, 0])
    x = pixels(batch=6, seed=4)
    logits = served(x, ids)
    for row, index in enumerate(ids.tolist()):
        with torch.no_grad():
            torch.testing.assert_close(logits[row], tasks[index](x[row : row + 1])[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="changes the backbone's weights"):
        MultiTask(backbone, [make("lora", backbone)])


def test_vptune_train_on_a_saved_swin_folder(tmp_path, tiny_task) -> None:
    folder = tmp_path / "tiny-swin"
    tiny_swin().save_pretrained(folder)
    assert isinstance(vptune.load_backbone(f"hf:{folder}"), vptune.backbones.SwinBackbone)
    out = tmp_path / "run"
    argv = ["train", "--data", str(tiny_task), "--backbone", f"hf:{folder}", "--image-size", "16", "--out", str(out)]
    argv += ["--method", "vpt-deep", "--num-tokens", "2", "--epochs", "2", "--warmup-epochs", "1"]
    assert main([*argv, "--batch-size", "8", "--base-lr", "1", "--no-progress"]) == 0
    record = json.loads((out / "vptune.json").read_text())
    assert record["backbone"]["family"] == "swin"
    assert record["trainable_parameters"] == 2 * 2 * 16 + 2 * 2 * 32 + 32 * 3 + 3
    loaded = vptune.load_task(out)
    assert loaded.prompts.embeddings.shape == (1, 1, 2, 16 + 16 + 32 + 32)


def test_prompt_dropout_draws_a_mask_per_sample_and_only_while_training() -> None:
    backbone = swin_backbone()
    model = make("vpt-deep", backbone, prompt=PromptConfig(num_tokens=4, dropout=0.5))
    x = pixels(batch=1).expand(2, -1, -1, -1)  # the same image twice
    torch.manual_seed(0)
    with torch.no_grad():
        train = model.train().forward_features(x)
        assert not torch.equal(train[0], train[1])
        served = model.eval().forward_features(x)
    assert torch.equal(served[0], served[1])
