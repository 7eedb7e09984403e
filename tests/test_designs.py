"""The prompt designs beyond the paper: key-value prompts (E2VPT), Fourier prompts (VFPT) and prompts that start as
the backbone's own tokens (Self-Prompt Tuning), alone and together, on every family with attention."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import FAMILIES, IMAGE, ImageSet, pixels, tiny_backbone, tiny_dataset
from test_swin import pixels as swin_pixels
from test_swin import swin_backbone

import vptune
from vptune import PromptConfig, Splits, TrainConfig
from vptune.backbones.swin import prompted_block
from vptune.batched import why_not_batched
from vptune.engine import prepare
from vptune.methods import ALIASES, get_method
from vptune.methods.vpt import DEEP_PROMPT
from vptune.prompts import fourier, xavier_bound, xavier_norm
from vptune.prototypes import block_inputs, init_from_tokens
from vptune.tools import prompt_motion, scaled_start

DESIGNS = ("vpt-deep+kv", "vpt-deep+fourier", "vpt-deep+tokens", "vpt-deep+scaled-tokens", "vpt-deep+kv+fourier+tokens")
TRAINS = {
    "vpt-deep+scaled-tokens": {"prompts.embeddings"},
    "vpt-deep+kv": {"prompts.embeddings", "prompts.kv_keys", "prompts.kv_values"},
    "vpt-deep+fourier": {"prompts.embeddings"},
    "vpt-deep+tokens": {"prompts.embeddings"},
    "vpt-deep+kv+fourier+tokens": {"prompts.embeddings", "prompts.kv_keys", "prompts.kv_values"},
}


def backbone_of(family: str) -> vptune.Backbone:
    return swin_backbone() if family == "swin" else tiny_backbone(family)


def inputs(family: str, batch: int = 4) -> torch.Tensor:
    return swin_pixels(batch) if family == "swin" else pixels(tiny_backbone(family), batch)


def make(method: str, family: str, seed: int = 0, **prompt) -> vptune.TaskModel:
    backbone = backbone_of(family)
    config = PromptConfig(**{**get_method(method)[0].prompt, **prompt}) if prompt else None
    return vptune.build(method, backbone, 3, prompt=config, image_size=backbone.image_size, seed=seed)


ALL = (*FAMILIES, "swin")


# --- only the intended tensors train ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("method", DESIGNS)
def test_only_the_designs_tensors_train(family: str, method: str) -> None:
    model = make(method, family)
    trains = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trains == TRAINS[method] | {"head.weight", "head.bias"}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    data = tiny_dataset(8, size=model.image_size)
    vptune.fit(model, Splits(data), TrainConfig(epochs=1, batch_size=4, base_lr=1.0, warmup_epochs=0))
    assert all(torch.equal(frozen[name], p) for name, p in model.named_parameters() if name in frozen)
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters() if name in before)


# --- what a deep prompt's scale does ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_deep_prompts_reach_the_model_through_their_blocks_norm_alone(family: str) -> None:
    """VPT-Deep's prompts enter each block through its first norm and are replaced after it, so with a read-out that
    does not read them (``cls``) scaling any prompt token by a positive factor leaves the logits as they are, up to
    the norm's eps: a token's norm sets only how far a step turns it (vptune.tools.prompt_motion measures that).
    VPT-Shallow's prompt outputs flow on through the residual: not so there."""
    x = inputs(family)
    factors = torch.linspace(0.5, 5.0, 10).view(1, 1, 10, 1)  # one factor per token, every block
    for method, invariant in (("vpt-deep", True), ("vpt-shallow", False)):
        model = make(method, family, readout="cls").eval()
        before = model(x)
        with torch.no_grad():
            model.prompts.embeddings.mul_(factors)
        change = (model(x) - before).abs().max().item()
        assert (change < 1e-3) == invariant, (method, change)


# --- neutral values are plain VPT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL)
def test_a_design_at_its_neutral_value_is_plain_vpt_deep(family: str) -> None:
    """Off (kv_tokens 0, fourier 0, init xavier: the defaults) the code of VPT-Deep is the one test_golden.py and the
    skip table of test_prompts.py pin. Here: fourier 0.05 of 10 prompts is floor(0.5) = 0 tokens, so the Fourier
    path runs and must change nothing; and a run spec records no design field while it is off."""
    plain, other = make("vpt-deep", family), make("vpt-deep", family, **{**DEEP_PROMPT, "fourier": 0.05})
    assert other.prompt_config.fourier_tokens == 0 and plain.state_dict().keys() == other.state_dict().keys()
    assert all(torch.equal(a, other.state_dict()[name]) for name, a in plain.state_dict().items())
    x = inputs(family)
    assert torch.equal(plain.eval()(x), other.eval()(x))
    recorded = vptune.RunSpec(data="d", method="vpt-deep", prompt=plain.prompt_config).to_dict()["prompt"]
    assert "kv_tokens" not in recorded and "fourier" not in recorded  # recorded as before the designs existed
    on = vptune.RunSpec(data="d", method="vpt-deep", prompt=PromptConfig(kv_tokens=2, fourier=0.5)).to_dict()
    assert (on["prompt"]["kv_tokens"], on["prompt"]["fourier"]) == (2, 0.5)


# --- Fourier prompts --------------------------------------------------------------------------------------------------
def test_fourier_transforms_the_first_fraction_of_the_tokens() -> None:
    tokens = torch.randn(2, 10, 6)
    out = fourier(tokens, 4)
    assert torch.equal(out[:, 4:], tokens[:, 4:])
    expected = torch.fft.fft(torch.fft.fft(tokens[:, :4], dim=-1), dim=-2).real  # VFPT: width, then tokens
    torch.testing.assert_close(out[:, :4], expected)
    assert PromptConfig(num_tokens=10, fourier=0.5).fourier_tokens == 5
    assert PromptConfig(num_tokens=10, fourier=0.3).fourier_tokens == 3
    assert PromptConfig(num_tokens=7, fourier=0.5).fourier_tokens == 3


@pytest.mark.parametrize("family", ALL)
def test_fourier_one_is_vpt_deep_with_the_transformed_prompts(family: str) -> None:
    transformed = make("vpt-deep", family, fourier=1.0)
    plain = make("vpt-deep", family)
    with torch.no_grad():
        plain.head.load_state_dict(transformed.head.state_dict())
        embeddings = transformed.prompts.embeddings
        if transformed.prompts.side_by_side:  # Swin: each block's set is its own slice of the width
            sets, start = [], 0
            for width in transformed.prompts.widths:
                sets.append(torch.fft.fft2(embeddings[..., start : start + width]).real)
                start += width
            plain.prompts.embeddings.copy_(torch.cat(sets, dim=-1))
        else:
            plain.prompts.embeddings.copy_(torch.fft.fft2(embeddings).real)
    x = inputs(family)
    torch.testing.assert_close(transformed.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(transformed(x), make("vpt-deep", family)(x))


# --- key-value prompts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_key_value_prompts_are_keys_and_values_after_projection(family: str) -> None:
    """A block with key-value prompts k(norm1(C)), v(norm1(C)) equals the block with C as keys and values only."""
    backbone = tiny_backbone(family)
    tokens = backbone.embed(pixels(backbone))
    context = torch.randn(1, 5, backbone.width, generator=torch.Generator().manual_seed(1))
    block = backbone.blocks[1]
    parts = {role: block.get_submodule(path) for role, path in backbone.part_paths(block).items()}
    with torch.no_grad():
        normed = parts["norm1"](context)
        kv = (parts["k"](normed), parts["v"](normed))
        with_kv = backbone.run_block(1, tokens, kv=kv)
        with_context = backbone.run_block(1, tokens, context=context)
        plain = backbone.run_block(1, tokens)
    assert with_kv.shape == plain.shape == tokens.shape  # no outputs for the key-value prompts
    torch.testing.assert_close(with_kv, with_context, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(with_kv, plain, atol=1e-4)


def test_swin_key_value_prompts_are_what_window_prompts_add_to_keys_and_values() -> None:
    """In a Swin window, prompt tokens are keys and values with no bias; as key-value prompts they give the patches
    the same outputs, and no outputs of their own."""
    backbone = swin_backbone()
    grid = backbone.embed(swin_pixels(2))
    block = backbone.blocks[1]
    patches, dims = grid.flatten(1, 2), tuple(grid.shape[1:3])
    prompts = torch.randn(1, 3, grid.shape[-1], generator=torch.Generator().manual_seed(2))
    window = backbone._window(1, dims)
    with torch.no_grad():
        normed = block.layernorm_before(prompts)
        kv = (block.attention.k_proj(normed), block.attention.v_proj(normed))
        as_prompts, _ = prompted_block(block, patches, prompts, dims, window)
        as_kv, none = prompted_block(block, patches, None, dims, window, kv)
    assert none is None and as_kv.shape == patches.shape
    torch.testing.assert_close(as_kv, as_prompts, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ALL)
def test_key_value_prompts_keep_the_sequence_and_change_the_output(family: str) -> None:
    with_kv, plain = make("vpt-deep+kv", family).eval(), make("vpt-deep", family).eval()
    shapes: dict[str, list] = {"kv": [], "plain": []}
    step = "_step" if family == "swin" else "run_block"  # Swin's prompted blocks run through its own step
    for key, model in (("kv", with_kv), ("plain", plain)):
        original = getattr(model.backbone, step)

        def recorded(*args, key=key, original=original, **kwargs):
            out = original(*args, **kwargs)
            outputs = out if isinstance(out, tuple) else (out,)
            shapes[key].append([tuple(t.shape) for t in outputs if torch.is_tensor(t)])
            return out

        setattr(model.backbone, step, recorded)
        with torch.no_grad():
            model(inputs(family))
    assert shapes["kv"] == shapes["plain"]  # every block's output: the same positions, no kv outputs
    with torch.no_grad():  # the same prompts and head: the key-value prompts alone make the difference
        plain.head.load_state_dict(with_kv.head.state_dict())
        plain.prompts.embeddings.copy_(with_kv.prompts.embeddings)
        x = inputs(family)
        assert not torch.allclose(with_kv(x), plain(x), atol=1e-5)


def test_timm_and_convnets_refuse_key_value_prompts() -> None:
    for design in ({"kv_tokens": 2}, {"fourier": 0.5}, {"init": "tokens"}):
        with pytest.raises(ValueError, match="needs a Transformer's tokens"):
            PromptConfig(location="pad", **design)
    # timm: tests/timm_checks.py (check_designs), on the stand-in here and on real timm where it installs


# --- prompts from the backbone's own tokens -----------------------------------------------------------------------
class Untouchable(ImageSet):
    """A split that fails if anything reads it."""

    def __getitem__(self, index: int):
        raise AssertionError("init 'tokens' read a split other than the training split")

    def eval_image(self, index: int):
        raise AssertionError("init 'tokens' read a split other than the training split")


@pytest.mark.parametrize("family", ALL)
def test_token_prompts_are_patch_tokens_each_block_receives(family: str) -> None:
    model = make("vpt-deep+tokens", family)
    data = tiny_dataset(6, size=model.image_size)
    init_from_tokens(model, data, seed=3)
    assert not model.prompts.tokens_pending
    x = model.preprocessing.normalize(torch.stack([data[i][0] for i in range(len(data))]))
    layers = model.prompts.layers
    with torch.no_grad():
        received = dict(block_inputs(model.backbone, x, layers))
    for layer in layers:
        prompts = model.prompts.select(layer, None)[0]  # (p, width)
        pool = received[layer].flatten(0, 1)
        for token in prompts:
            assert (pool == token).all(dim=1).any(), f"block {layer}: a prompt that is not one of its patch tokens"
        assert len({tuple(t.tolist()) for t in prompts}) == len(prompts)  # drawn without replacement


@pytest.mark.parametrize("method", ["vpt-deep+tokens", "vpt-deep+scaled-tokens"])
def test_token_prompts_are_deterministic_for_a_seed(method: str) -> None:
    data = tiny_dataset(6)
    models = [make(method, "dinov2") for _ in range(3)]
    for model, seed in zip(models, (0, 0, 1), strict=True):
        init_from_tokens(model, data, seed=seed)
    assert torch.equal(models[0].prompts.embeddings, models[1].prompts.embeddings)
    assert not torch.equal(models[0].prompts.embeddings, models[2].prompts.embeddings)


@pytest.mark.parametrize("method", ["vpt-deep+tokens", "vpt-deep+scaled-tokens"])
def test_fit_draws_token_prompts_from_the_training_split_alone_once(method: str) -> None:
    model, reference = make(method, "vit"), make(method, "vit")
    train = tiny_dataset(6)
    others = Untouchable(train.images, train.labels)
    prepare(model, Splits(train, others, others), TrainConfig(seed=5, cache="off"), torch.device("cpu"))
    init_from_tokens(reference, train, seed=5)
    assert torch.equal(model.prompts.embeddings, reference.prompts.embeddings)
    assert not model.prompts.tokens_pending
    with torch.no_grad():
        model.prompts.embeddings.add_(1.0)  # as if trained: a second prepare must not draw again
    trained = model.prompts.embeddings.clone()
    prepare(model, Splits(train), TrainConfig(seed=5), torch.device("cpu"))
    assert torch.equal(model.prompts.embeddings, trained)


@pytest.mark.parametrize("family", ALL)
def test_scaled_token_prompts_are_the_same_tokens_at_a_xavier_prompts_norm(family: str) -> None:
    """init 'scaled-tokens' draws the tokens 'tokens' draws (same seed, same images) and sets each one's norm to the
    root-mean-square norm of a Xavier prompt of its width, its direction kept; on Swin each stage at its width."""
    data = tiny_dataset(6, size=inputs(family).shape[-1])
    tokens, scaled = make("vpt-deep+tokens", family), make("vpt-deep+scaled-tokens", family)
    for model in (tokens, scaled):
        init_from_tokens(model, data, seed=2)
    backbone = scaled.backbone
    for layer in scaled.prompts.layers:
        drawn, rescaled = tokens.prompts.select(layer, None)[0], scaled.prompts.select(layer, None)[0]
        width = backbone.block_width(layer)
        norm = xavier_norm(backbone.patch_size, backbone.block_width(0), width)
        torch.testing.assert_close(rescaled.norm(dim=-1), torch.full((len(drawn),), norm))
        cosine = torch.nn.functional.cosine_similarity(rescaled, drawn, dim=-1)
        torch.testing.assert_close(cosine, torch.ones_like(cosine))
        assert not torch.allclose(drawn.norm(dim=-1), rescaled.norm(dim=-1))  # the tokens' own norms differ


def test_xavier_norm_is_the_norm_xavier_prompts_have() -> None:
    """The paper's Xavier prompts of ViT-S/14 (d = 384) have norm 0.89; xavier_norm says so, and so does a draw."""
    assert xavier_norm(14, 384, 384) == pytest.approx(0.8889, abs=1e-4)
    bound = xavier_bound(14, 384)
    draw = torch.empty(20000, 384).uniform_(-bound, bound, generator=torch.Generator().manual_seed(0))
    assert draw.norm(dim=-1).pow(2).mean().sqrt().item() == pytest.approx(xavier_norm(14, 384, 384), rel=2e-3)
    assert xavier_norm(4, 768, 192) == pytest.approx(xavier_bound(4, 768) * 8)


def test_scaled_token_designs_compose_with_the_others_but_not_with_tokens() -> None:
    names = ALIASES
    assert {"vpt-deep+scaled-tokens", "vpt-deep+kv+scaled-tokens", "vpt-deep+kv+fourier+scaled-tokens"} <= set(names)
    assert not [name for name in names if "+tokens" in name and "scaled-tokens" in name]
    assert get_method("vpt-deep+kv+scaled-tokens")[0].prompt["init"] == "scaled-tokens"
    assert why_not_batched("vpt-deep", get_method("vpt-deep+scaled-tokens")[0].prompt_config())
    with pytest.raises(ValueError, match="scaled-tokens"):
        PromptConfig(init="scaled-tokens", location="add")


@pytest.mark.parametrize("method", ["vpt-deep+tokens", "vpt-deep+scaled-tokens"])
def test_loaded_token_prompts_are_not_drawn_again(tmp_path, method: str) -> None:
    model = make(method, "dinov2")
    init_from_tokens(model, tiny_dataset(6), seed=0)
    vptune.save_task(model, tmp_path / "task")
    loaded = vptune.load_task(tmp_path / "task", backbone=model.backbone)
    assert not loaded.prompts.tokens_pending
    assert torch.equal(loaded.prompts.embeddings, model.prompts.embeddings)


def test_batched_training_refuses_token_prompts_not_yet_drawn() -> None:
    from vptune.batched import fit_batched

    backbone = tiny_backbone("vit")
    prompt = PromptConfig(**DEEP_PROMPT, init="tokens")  # vpt-deep is batchable; its prompts here are not yet drawn
    models = [vptune.build("vpt-deep", backbone, 3, prompt=prompt, image_size=IMAGE, seed=s) for s in (0, 1)]
    with pytest.raises(ValueError, match="one at a time"):
        fit_batched(models, Splits(tiny_dataset(8)), [TrainConfig(epochs=1, batch_size=4)] * 2)
    assert why_not_batched("vpt-deep", get_method("vpt-deep+tokens")[0].prompt_config())
    assert why_not_batched("vpt-deep", get_method("vpt-deep+kv")[0].prompt_config()) is None


# --- designs are prompt options; their recipes are aliases ---------------------------------------------------------
@pytest.mark.parametrize("recipe", sorted(ALIASES))
def test_a_recipe_builds_and_records_what_its_options_build(recipe: str) -> None:
    backbone = tiny_backbone("dinov2")
    options = get_method(recipe)[0].prompt
    by_name = vptune.build(recipe, backbone, 3, image_size=IMAGE, seed=1)
    by_options = vptune.build("vpt-deep", backbone, 3, PromptConfig(**options), IMAGE, seed=1)
    assert by_name.method == by_options.method == "vpt-deep" and by_name.prompt_config == by_options.prompt_config
    assert all(torch.equal(by_name.state_dict()[k], t) for k, t in by_options.state_dict().items())
    assert recipe not in vptune.method_names()  # a recipe is not a method


def test_a_recipe_in_a_run_spec_is_recorded_as_its_method_and_options() -> None:
    spec = vptune.RunSpec("eurosat", "vpt-deep+kv+fourier")
    assert spec.method == "vpt-deep" and (spec.prompt.kv_tokens, spec.prompt.fourier) == (5, 0.5)
    flags = vptune.RunSpec.from_layers({"data": "eurosat", "prompt": {"kv_tokens": 5, "fourier": 0.5}})
    assert flags.to_dict() == spec.to_dict()


# --- saved, reloaded and served -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["dinov2", "swin"])
def test_designs_reload_exactly(tmp_path, family: str) -> None:
    model = make("vpt-deep+kv+fourier+tokens", family)
    init_from_tokens(model, tiny_dataset(6, size=model.image_size), seed=0)
    vptune.save_task(model, tmp_path / "task")
    record = json.loads((tmp_path / "task" / "vptune.json").read_text())
    assert record["prompt"]["kv_tokens"] == 5 and record["prompt"]["fourier"] == 0.5
    assert record["prompt"]["init"] == "tokens"
    loaded = vptune.load_task(tmp_path / "task", backbone=model.backbone)
    x = inputs(family)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_multitask_serves_key_value_and_fourier_tasks_in_one_batch() -> None:
    backbone = tiny_backbone("dinov2")
    tasks = [
        vptune.build(method, backbone, 3, image_size=IMAGE, seed=seed)
        for method, seed in (("vpt-deep+kv", 0), ("vpt-deep+kv", 1), ("vpt-deep+fourier", 2), ("vpt-deep", 3))
    ]
    for task in tasks:
        task.eval()
    served = vptune.MultiTask(backbone, tasks)
    assert len(served.groups()) == 3  # the two key-value tasks share one stacked group
    x = pixels(backbone, 8)
    ids = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    with torch.no_grad():
        out = served(x, ids)
        for row, task_id in enumerate(ids.tolist()):
            torch.testing.assert_close(out[row], tasks[task_id](x[row : row + 1])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["tokens", "scaled-tokens"])
def test_the_cli_trains_with_token_prompts(tmp_path, tiny_task, saved_backbone, init: str) -> None:
    from vptune.cli import main

    out = tmp_path / "run"
    code = main([
        "train", "--data", str(tiny_task), "--method", "vpt-deep", "--backbone", saved_backbone, "--image-size", "16",
        "--epochs", "1", "--batch-size", "8", "--init", init, "--kv-tokens", "2", "--fourier", "0.5",
        "--num-tokens", "4", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    record = json.loads((out / "vptune.json").read_text())
    assert {k: record["prompt"][k] for k in ("init", "kv_tokens", "fourier")} == {
        "init": init, "kv_tokens": 2, "fourier": 0.5,
    }  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["prompt"]["kv_tokens"] == 2


def test_the_cli_trains_a_recipe_as_its_method_and_options(tmp_path, tiny_task, saved_backbone, monkeypatch) -> None:
    from safetensors.torch import load_file

    from vptune.cli import main

    monkeypatch.chdir(tmp_path)
    common = ["train", "--data", str(tiny_task), "--backbone", saved_backbone, "--image-size", "16", "--epochs", "1"]
    common += ["--batch-size", "8", "--num-tokens", "2", "--no-progress"]
    assert main([*common, "--method", "vpt-deep+kv+fourier"]) == 0
    assert main([*common, "--method", "vpt-deep", "--kv-tokens", "5", "--fourier", "0.5", "--out", "options"]) == 0
    recipe = tmp_path / "runs" / f"{tiny_task.name}-vpt-deep+kv+fourier"  # the default folder names what was asked
    records = [json.loads((folder / "vptune.json").read_text()) for folder in (recipe, tmp_path / "options")]
    assert records[0]["method"] == records[1]["method"] == "vpt-deep" and records[0]["prompt"] == records[1]["prompt"]
    assert json.loads((recipe / "config.json").read_text())["method"] == "vpt-deep"
    ours, theirs = (load_file(folder / "weights.safetensors") for folder in (recipe, tmp_path / "options"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("init", ["tokens", "xavier"])
def test_prompt_motion_rebuilds_the_prompts_a_run_started_from(tmp_path, tiny_task, saved_backbone, init) -> None:
    """vptune.tools.prompt_motion compares a run's trained prompts with the ones it started from, rebuilt from its
    config.json: after a step of lr 1e-9 they are the same (cosine 1, equal norms), after training at lr 50 they
    are not."""
    from vptune.cli import main

    cosines = {}
    for lr, epochs in ((1e-9, 1), (50.0, 3)):
        out = tmp_path / f"run-{lr}"
        code = main([
            "train", "--data", str(tiny_task), "--method", "vpt-deep", "--backbone", saved_backbone, "--init", init,
            "--image-size", "16", "--epochs", str(epochs), "--batch-size", "8", "--num-tokens", "4",
            "--base-lr", str(lr), "--warmup-epochs", "0", "--out", str(out),
        ])  # fmt: skip
        assert code == 0
        rows = prompt_motion.motion(out)
        assert len(rows) == 2  # the tiny backbone's two blocks
        cosines[lr] = min(row["cosine"] for row in rows)
        if lr == 1e-9:
            assert all(row["norm_start"] == pytest.approx(row["norm_end"], rel=1e-5) for row in rows)
    assert cosines[1e-9] > 0.99999 and cosines[50.0] < 0.999


@pytest.mark.parametrize("init", ["tokens", "xavier"])
def test_scaled_start_at_scale_one_trains_the_recorded_run_again(tmp_path, tiny_task, saved_backbone, init) -> None:
    """vptune.tools.scaled_start retrains a run from its own config with the starting prompts scaled: at scale 1
    it gives the run's recorded accuracies exactly, at another scale or a set norm other ones; a scale of 0 is
    refused; ``norm`` sets every token's norm and keeps its direction."""
    from vptune.cli import main

    out = tmp_path / "run"
    code = main([
        "train", "--data", str(tiny_task), "--method", "vpt-deep", "--backbone", saved_backbone, "--init", init,
        "--image-size", "16", "--epochs", "2", "--batch-size", "8", "--num-tokens", "4", "--base-lr", "5",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    recorded = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    again = scaled_start.train_scaled(out, 1.0)
    assert again["test_accuracy"] == recorded["test_accuracy"]
    assert again["train_loss"] == pytest.approx(recorded["train_loss"], rel=1e-6)
    assert scaled_start.train_scaled(out, 0.01)["train_loss"] != pytest.approx(recorded["train_loss"], rel=1e-3)
    assert scaled_start.train_scaled(out, norm=0.01)["train_loss"] != pytest.approx(recorded["train_loss"], rel=1e-3)
    with pytest.raises(ValueError, match="positive"):
        scaled_start.train_scaled(out, 0.0)
    tokens = torch.randn(2, 3, 5)
    rescaled = tokens.clone()
    scaled_start.rescale(rescaled, norm=0.5)
    assert torch.allclose(rescaled.norm(dim=-1), torch.full((2, 3), 0.5))
    assert torch.allclose(torch.nn.functional.cosine_similarity(rescaled, tokens, dim=-1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="one of"):
        scaled_start.rescale(tokens, scale=2.0, norm=1.0)


def test_a_design_option_outside_its_range_is_refused() -> None:
    for bad, match in (
        ({"kv_tokens": -1}, "kv_tokens"),
        ({"fourier": 1.5}, "fourier"),
        ({"fourier": 0.5, "location": "add"}, "fourier"),
        ({"init": "tokens", "project": 8}, "project"),
    ):
        with pytest.raises(ValueError, match=match):
            PromptConfig(**bad)  # fmt: skip
    assert dataclasses.replace(PromptConfig(), kv_tokens=0).enabled
