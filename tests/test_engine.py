"""The training engine: per-step schedule, reproducibility, the metrics log, divergence, and a frozen backbone."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEPTH, IMAGE, tiny_backbone, tiny_dataset
from torch.optim.optimizer import register_optimizer_step_pre_hook

import vptune
import vptune.engine
from vptune import PromptConfig, Splits, TrainConfig, TrainingDiverged
from vptune.engine import METRICS, lr_at
from vptune.preprocessing import normalize

CLASSES = 3


def settings(**changes) -> TrainConfig:
    """A tiny CPU run: batches of 4, two epochs, one of warmup."""
    base = dict(epochs=2, warmup_epochs=1, batch_size=4, base_lr=2.0, device="cpu", progress=False, eval_batch_size=8)
    return TrainConfig(**{**base, **changes})


def model_for(backbone: vptune.Backbone, method: str = "vpt-deep", seed: int = 0, **prompt) -> vptune.TaskModel:
    config = PromptConfig(**{"num_tokens": 3, **prompt}) if method != "linear" else None
    return vptune.build(method, backbone, CLASSES, config, image_size=IMAGE, seed=seed)


# --- learning-rate schedule ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (12, 4), (10, 0), (6, 6), (7, 1)])
def test_lr_schedule(total: int, warmup: int) -> None:
    peak = 0.3
    lrs = [lr_at(step, total, warmup, peak) for step in range(total)]
    assert lrs[0] > 0  # the first step trains (the released code's first epoch had lr 0)
    assert max(lrs) == pytest.approx(peak) and min(lrs) > 0
    if warmup:
        assert lrs[:warmup] == pytest.approx([peak * (step + 1) / warmup for step in range(warmup)])  # linear
    decay = lrs[warmup:]
    assert all(later <= earlier for earlier, later in zip(decay, decay[1:], strict=False))
    if decay:
        assert lr_at(total, total, warmup, peak) == pytest.approx(0, abs=1e-12)  # the cosine ends at 0
    if decay and (total - warmup) % 2 == 0:
        assert lr_at(warmup + (total - warmup) // 2, total, warmup, peak) == pytest.approx(peak / 2)


def test_cosine_ends_near_zero() -> None:
    assert lr_at(99, 100, 10, 1.0) < 1e-3


def test_fit_sets_the_lr_every_step(backbone: vptune.Backbone) -> None:
    config = settings(epochs=3, warmup_epochs=1.5, base_lr=3.2)
    seen: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, *_: seen.append(optimizer.param_groups[0]["lr"]))
    try:
        vptune.fit(model_for(backbone), Splits(tiny_dataset(16)), config)
    finally:
        handle.remove()
    peak = 3.2 * 4 / 256  # base_lr * batch_size / 256
    assert len(seen) == 12  # 4 steps per epoch
    assert seen[:6] == pytest.approx([peak * (step + 1) / 6 for step in range(6)])
    assert seen == pytest.approx([lr_at(step, 12, 6, peak) for step in range(12)])
    assert seen[-1] < 0.1 * peak


# --- reproducibility -------------------------------------------------------------------------------------------


def test_same_seed_same_trained_prompts(family: str) -> None:
    def run(seed: int, state: int) -> dict[str, torch.Tensor]:
        model = model_for(tiny_backbone(family), dropout=0.1)
        torch.manual_seed(state)  # whatever the global generator holds before, fit seeds itself
        vptune.fit(model, Splits(tiny_dataset(12)), settings(seed=seed))
        return model.trainable_state_dict()

    first, again, other = run(0, state=1), run(0, state=2), run(1, state=1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["prompts.embeddings"], other["prompts.embeddings"])


# --- the frozen backbone ---------------------------------------------------------------------------------------

FIT_CASES = {
    "linear": ("linear", {}),
    "shallow": ("vpt-shallow", {}),
    "deep-project-dropout": ("vpt-deep", {"project": 8, "dropout": 0.1}),
    "deep-add": ("vpt-deep", {"location": "add"}),
    "prepend-pixel": ("vpt-shallow", {"location": "prepend-pixel"}),
    "concat-channel": ("vpt-shallow", {"location": "concat-channel"}),
}


@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_changes_only_what_trains(backbone: vptune.Backbone, case: str) -> None:
    method, options = FIT_CASES[case]
    model = model_for(backbone, method, **options)
    frozen = copy.deepcopy(backbone.state_dict())
    start = {name: tensor.clone() for name, tensor in model.trainable_state_dict().items()}
    vptune.fit(model, Splits(tiny_dataset(8)), settings(weight_decay=0.01))
    after = backbone.state_dict()
    assert after.keys() == frozen.keys()
    assert all(torch.equal(after[name], frozen[name]) for name in frozen)
    assert all(param.grad is None for param in backbone.parameters())
    trained = model.trainable_state_dict()
    assert trained.keys() == start.keys()
    assert all(not torch.equal(trained[name], start[name]) for name in start)


def test_backbone_stays_in_eval_mode_while_training(backbone: vptune.Backbone) -> None:
    model = model_for(backbone, dropout=0.1)
    states = []

    def check(module, args, output) -> None:
        if torch.is_grad_enabled():  # training steps, not the evaluations
            backbone_modes = {m.training for m in [backbone, *backbone.model.modules()]}
            states.append((model.training, model.prompts.training, backbone_modes))

    handle = backbone.blocks[-1].mlp.register_forward_hook(check)
    try:
        vptune.fit(model, Splits(tiny_dataset(8), val=tiny_dataset(4)), settings())
    finally:
        handle.remove()
    assert len(states) == 4
    assert all(state == (True, True, {False}) for state in states)  # prompt dropout on, backbone dropout off
    assert not model.training  # fit leaves the model ready for inference


def test_fit_learns(backbone: vptune.Backbone) -> None:
    model, data = model_for(backbone), tiny_dataset(12)
    before = vptune.evaluate(model, data, device="cpu")["loss"]
    vptune.fit(model, Splits(data), settings(epochs=5, base_lr=0.5))
    assert vptune.evaluate(model, data, device="cpu")["loss"] < before / 2


# --- metrics log and divergence --------------------------------------------------------------------------------


@pytest.mark.parametrize("with_test", [True, False])
def test_metrics_log_has_one_line_per_epoch(tmp_path: Path, backbone: vptune.Backbone, with_test: bool) -> None:
    splits = Splits(tiny_dataset(8), val=tiny_dataset(6, seed=1), test=tiny_dataset(6, seed=2) if with_test else None)
    model = model_for(backbone)
    for _ in range(2):  # a second run into the same folder starts a new log
        result = vptune.fit(model, splits, settings(epochs=3), out_dir=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    assert len(rows) == 3 + with_test
    assert [row["epoch"] for row in rows[:3]] == [1, 2, 3] and not any(row.get("final") for row in rows[:3])
    for row in rows:
        assert math.isfinite(row["train_loss"]) and 0 <= row["train_accuracy"] <= 1 and 0 <= row["val_accuracy"] <= 1
    steps = [2 * epoch - 1 for epoch in (1, 2, 3)]  # 8 images, batch 4: the lr of each epoch's last step
    assert [row["lr"] for row in rows[:3]] == pytest.approx([lr_at(step, 6, 2, settings().lr) for step in steps])
    assert rows[2]["val_accuracy"] == vptune.evaluate(model, splits.val, device="cpu")["accuracy"]  # the last model
    if with_test:
        assert rows[3]["final"] is True
        assert rows[3]["test_accuracy"] == vptune.evaluate(model, splits.test, device="cpu")["accuracy"]
        assert result == {key: value for key, value in rows[3].items() if key != "final"}
    else:
        assert result == rows[2] and "test_accuracy" not in result


def test_nan_loss_raises_with_epoch_step_and_lr(tmp_path: Path, backbone: vptune.Backbone) -> None:
    model = model_for(backbone)
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) > 2 else output  # from the first step of epoch 2

    model.head.register_forward_hook(poison)
    config = settings(epochs=3, val_split=None)
    with pytest.raises(TrainingDiverged) as error:
        vptune.fit(model, Splits(tiny_dataset(8)), config, out_dir=tmp_path)
    message = str(error.value)
    assert "nan" in message and "epoch 2" in message and "step 3" in message
    assert f"lr {lr_at(2, 6, 2, config.lr):.4g}" in message
    lines = (tmp_path / METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


@pytest.mark.parametrize("epochs", [1, 2])
def test_an_update_that_makes_the_tensors_non_finite_stops_the_run_at_that_step(backbone, epochs: int) -> None:
    """The loss and the gradient of the first step are finite; the update is not (an lr of 3.4e38, the largest a
    float32 holds, and a weight decay of 1000): the check after the optimiser step stops the run there, on its last
    step too (nothing else would: no val or test split)."""
    model = model_for(backbone, "linear")
    config = settings(epochs=epochs, warmup_epochs=0, base_lr=3.4e38 * 256 / 4, weight_decay=1e3, momentum=0.0)
    config = dataclasses.replace(config, val_split=None, test_split=None)
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 1 \(lr .*\): the update made the trained tensors"):
        vptune.fit(model, Splits(tiny_dataset(4)), dataclasses.replace(config, batch_size=4))


def test_exploding_lr_raises(tmp_path: Path, backbone: vptune.Backbone) -> None:
    model = model_for(backbone, "linear")
    with pytest.raises(TrainingDiverged, match=r"at epoch \d+, step \d+ \(lr [0-9.e+]+\)") as error:
        vptune.fit(model, Splits(tiny_dataset(8)), settings(epochs=50, base_lr=1e38, momentum=0.0), out_dir=tmp_path)
    epoch = int(re.search(r"at epoch (\d+)", str(error.value))[1])
    lines = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, epoch))  # every finished epoch, none after


# --- evaluation and configuration --------------------------------------------------------------------------------


def test_evaluate_matches_a_direct_computation(backbone: vptune.Backbone) -> None:
    model, data = model_for(backbone).train(), tiny_dataset(10)
    result = vptune.evaluate(model, data, batch_size=4, device="cpu")
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        logits = model(normalize(data.images, backbone.mean, backbone.std))
    labels = torch.tensor(data.labels)
    assert result["count"] == 10
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_fit_reads_a_task_folder(tmp_path: Path, backbone: vptune.Backbone) -> None:
    from test_data import make_vtab  # a tiny on-disk task in the VTAB layout

    result = vptune.fit(model_for(backbone), make_vtab(tmp_path / "task"), settings(epochs=1))
    assert result["epoch"] == 1 and {"val_accuracy", "test_accuracy"} <= set(result)


@pytest.mark.parametrize(
    ("field", "value"), [("epochs", 0), ("warmup_epochs", -1), ("batch_size", 0), ("base_lr", 0), ("weight_decay", -1)]
)
def test_bad_train_config(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_actual_lr_scales_with_batch() -> None:
    assert TrainConfig(base_lr=0.5, batch_size=128).lr == 0.25


def test_bf16_autocast_trains_and_reports_fp32_metrics() -> None:
    """precision=bf16 (the CUDA default) runs the forward under bf16 autocast; checked on CPU autocast here. The
    metrics are computed in fp32 from the bf16 logits: the same as an fp32 cross-entropy of those logits."""
    model = model_for(tiny_backbone("dinov2"))
    seen = []
    handle = model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    val = tiny_dataset(4, seed=1)
    metrics = vptune.fit(model, Splits(tiny_dataset(8), val=val), settings(precision="bf16"))
    handle.remove()
    assert torch.bfloat16 in seen and model.prompts.embeddings.dtype == torch.float32  # parameters stay fp32
    scored = vptune.evaluate(model, val, device="cpu", precision="bf16")
    x, labels = model.preprocessing.normalize(val.images), torch.tensor(val.labels)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    fp32_loss = F.cross_entropy(logits.float(), labels).item()
    assert scored["loss"] == pytest.approx(fp32_loss, rel=1e-6) and isinstance(metrics["train_loss"], float)
    assert metrics["val_accuracy"] == scored["accuracy"] == (logits.float().argmax(1) == labels).float().mean().item()


@pytest.mark.parametrize("method", ["vpt-deep", "lora", "bias"])
@pytest.mark.parametrize("recompute", [{"checkpointing": True}, {"checkpoint_blocks": 1}])  # every block; the first
def test_gradient_checkpointing_trains_the_same_tensors(family: str, method: str, recompute: dict) -> None:
    def run(**options) -> vptune.TaskModel:
        prompt = {"dropout": 0.1} if method == "vpt-deep" else {}  # dropout draws the same masks both ways
        model = model_for(tiny_backbone(family), method, **prompt)
        vptune.fit(model, Splits(tiny_dataset(12)), settings(base_lr=0.5, **options))
        return model

    plain, recomputed = run(), run(**recompute)
    first, second = plain.trainable_state_dict(), recomputed.trainable_state_dict()
    assert first.keys() == second.keys()
    assert all(torch.allclose(first[name], second[name], atol=1e-6) for name in first)
    assert recomputed._recompute == 0  # fit turns it off again


def test_compiled_training_trains_the_same_tensors() -> None:
    def run(compile: bool) -> vptune.TaskModel:
        model = model_for(tiny_backbone("dinov2"), "vpt-deep", dropout=0.0)  # compiled dropout draws other masks
        vptune.fit(model, Splits(tiny_dataset(12)), settings(base_lr=0.5, compile=compile))
        return model

    eager, compiled = run(False).trainable_state_dict(), run(True).trainable_state_dict()
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-5, rtol=0)
    assert any(not torch.equal(value, model_for(tiny_backbone("dinov2"), "vpt-deep").trainable_state_dict()[name])
               for name, value in compiled.items())  # fmt: skip


def test_gradient_checkpointing_keeps_fewer_activations() -> None:
    model = model_for(tiny_backbone("dinov2"), "vpt-deep").train()
    x = normalize(torch.randint(0, 256, (4, 3, IMAGE, IMAGE), dtype=torch.uint8), (0.5,) * 3, (0.5,) * 3)

    def saved_bytes(blocks: int) -> int:
        total = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), model.recomputing(blocks):
            model(x).sum()
        return total[0]

    every_block, first_block, none = saved_bytes(DEPTH), saved_bytes(1), saved_bytes(0)
    assert every_block < none / 2 and every_block < first_block < none


def test_checkpoint_blocks_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="checkpoint_blocks must be >= 0"):
        vptune.TrainConfig(checkpoint_blocks=-1)


def test_resident_batches_train_the_same_tensors_as_a_data_loader(monkeypatch) -> None:
    from vptune import data

    def trained(limit: int) -> dict:
        monkeypatch.setattr(data, "RESIDENT_LIMIT", limit)  # 0: every split streams through a DataLoader
        model = model_for(tiny_backbone("vit"))
        vptune.fit(model, Splits(tiny_dataset(10), val=tiny_dataset(4, seed=1)), settings(cache="off"))
        return model.trainable_state_dict()

    resident, streamed = trained(data.RESIDENT_LIMIT), trained(0)
    for name, tensor in resident.items():
        assert torch.equal(tensor, streamed[name]), name


def test_every_update_is_checked(backbone: vptune.Backbone, monkeypatch) -> None:
    """The loss is finite, the gradients are not: training stops before the update (the released loop would not)."""
    model = model_for(backbone)
    model.prompts.embeddings.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 1 .*gradient norm inf"):
        vptune.fit(model, Splits(tiny_dataset(8)), settings())
    assert torch.isfinite(model.prompts.embeddings).all()  # stopped before the update


def test_a_loss_above_the_limit_is_divergence(backbone: vptune.Backbone) -> None:
    model = model_for(backbone)
    with pytest.raises(TrainingDiverged, match="the limit: max_loss 0.001"):
        vptune.fit(model, Splits(tiny_dataset(8)), settings(max_loss=0.001))
    vptune.fit(model_for(backbone), Splits(tiny_dataset(8)), settings(max_loss=None))  # none: no limit


def test_no_score_and_no_file_from_non_finite_weights(tmp_path: Path, backbone: vptune.Backbone) -> None:
    model = model_for(backbone, "linear")
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    with pytest.raises(vptune.engine.NonFiniteOutput, match="NaN or infinite"):
        vptune.evaluate(model, tiny_dataset(4), device="cpu")
    with pytest.raises(vptune.TaskFileError, match="not saved: head.weight hold NaN or infinite values"):
        vptune.save_task(model, tmp_path)
    assert not (tmp_path / "weights.safetensors").exists()
