"""K configurations in one pass: K prompt sets and heads of one structure train together on a frozen backbone.

Every batch is loaded once and runs through the backbone as one batch of K*B (sample i of configuration k uses
prompt set and head k); the loss is the sum of the K configurations' mean losses, so each configuration's gradient
is exactly its own. Each configuration keeps its own lr schedule, weight decay and momentum (:func:`stacked_sgd_step`
applies them row by row). The step, its checks and its metrics are :func:`vptune.fit`'s (:mod:`vptune.loop`): a
configuration that diverges stops and is recorded as diverged while the others finish. Equal to K separate
:func:`vptune.fit` runs that share the sample order (``data_seed``) and have no prompt dropout; the tests hold them to
1e-5.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .data import TaskData
from .distributed import world_size
from .engine import Splits, TrainConfig, prepare, resolve_device
from .loop import Trainee, recomputed_blocks, scores, train_epoch
from .methods import METHODS, get_method
from .model import TaskModel
from .prompts import PromptConfig
from .stacking import stack, unstack

SHARED_FIELDS = (
    "epochs", "warmup_epochs", "batch_size", "train_split", "val_split", "test_split", "precision", "cache", "device",
    "checkpointing", "checkpoint_blocks", "compile",
)  # fmt: skip


def fit_batched(
    models: list[TaskModel], data: str | os.PathLike | TaskData | Splits, configs: list[TrainConfig]
) -> list[dict]:
    """Train ``models[k]`` with ``configs[k]`` for every k in one pass; return each one's final metrics.

    All models share the backbone, method, prompt structure and input size; the configs may differ in base lr,
    weight decay, momentum, ``max_loss`` and seed (initialisation), and share the schedule, the sample order
    (``configs[0].data_seed``, default its seed) and how the step runs (precision, checkpointing, compile).
    A configuration that diverges stops there: its metrics are ``{"diverged": why, "val_accuracy": None,
    "test_accuracy": None}`` and its model keeps the tensors it started with; the others train on, as they would
    alone.
    """
    configs = [config.for_method(models[0].method) for config in configs]
    _check(models, configs)
    first = configs[0]
    stacked = stack(models)
    training = prepare(stacked, data, first, resolve_device(first.device))
    module = torch.compile(stacked) if first.compile else stacked
    trainee = Trainee(training.stage, module, configs, _sgd_step(stacked, configs), stacked=True)
    history: list[dict] = [{} for _ in models]
    stacked.train()
    torch.manual_seed(first.seed)
    with stacked.recomputing(recomputed_blocks(stacked, first)):
        for epoch in range(1, first.epochs + 1):
            for k, metrics in train_epoch(trainee, training, epoch).items():
                history[k] = {**metrics, "batched": len(models)}
            if not trainee.live:
                break
    if training.splits.test is not None and trainee.live:
        for k, accuracy in scores(trainee, training, training.splits.test, "test").items():
            history[k]["test_accuracy"] = accuracy
    stacked.eval()
    unstack(stacked, models, rows=trainee.live)
    for k, reason in trainee.diverged.items():
        history[k] = {"diverged": reason, "val_accuracy": None, "test_accuracy": None}
    return history


def _sgd_step(stacked: TaskModel, configs: list[TrainConfig]):
    """The row-wise SGD of the stacked tensors (no weight decay on the head's bias, as :func:`vptune.fit`)."""
    params = [p for p in stacked.parameters() if p.requires_grad]
    decays = [p is not stacked.classifier.bias for p in params]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    return lambda lrs: stacked_sgd_step(params, buffers, lrs, configs, decays)


@torch.no_grad()
def stacked_sgd_step(
    params: list[nn.Parameter],
    buffers: list[torch.Tensor | None],
    lrs: torch.Tensor,
    configs: list[TrainConfig],
    decays: list[bool] | None = None,
) -> None:
    """``torch.optim.SGD`` (momentum, weight decay) applied to row k of every stacked tensor with config k's values;
    ``decays[i]`` False: no weight decay on ``params[i]``."""
    for index, param in enumerate(params):
        shape = (-1,) + (1,) * (param.dim() - 1)
        decayed = decays is None or decays[index]
        rates = [c.weight_decay if decayed else 0.0 for c in configs]
        decay = torch.tensor(rates, dtype=param.dtype, device=param.device).view(shape)
        momentum = torch.tensor([c.momentum for c in configs], dtype=param.dtype, device=param.device).view(shape)
        step = param.grad + decay * param
        buffers[index] = step.clone() if buffers[index] is None else momentum * buffers[index] + step
        param -= lrs.to(param.dtype).to(param.device).view(shape) * buffers[index]


def why_not_batched(method: str, prompt: PromptConfig | None, tokens_drawn: bool = False) -> str | None:
    """Why runs of ``method`` with ``prompt`` cannot train in one pass, or None when they can. Token-initialised
    prompts are drawn from the training images as each run starts (unless ``tokens_drawn``)."""
    if not get_method(method)[0].batchable:
        return f"method {method!r} cannot be batched; batchable: {', '.join(batchable_methods())}"
    if prompt is not None and prompt.enabled and not prompt.stacks:
        return "prompts with a projection or an input channel cannot be batched (per-config modules)"
    if prompt is not None and prompt.from_tokens and not tokens_drawn:
        return (
            "prompts with init 'tokens' or 'scaled-tokens' are drawn from the training images when each run's "
            "training starts: train such models one at a time (not batched)"
        )
    return None


def _check(models: list[TaskModel], configs: list[TrainConfig]) -> None:
    if not models or len(models) != len(configs):
        raise ValueError(f"give one config per model: {len(models)} models, {len(configs)} configs")
    first = models[0]
    drawn = not any(getattr(model.prompts, "tokens_pending", False) for model in models)
    refusal = why_not_batched(first.method, first.prompt_config, tokens_drawn=drawn)
    if refusal:
        raise ValueError(refusal)
    for model in models[1:]:
        same = (model.method, model.prompt_config, model.image_size, model.num_classes) == (
            first.method, first.prompt_config, first.image_size, first.num_classes
        )  # fmt: skip
        if not same or model.backbone is not first.backbone:
            raise ValueError("batched models must share backbone, method, prompt config, input size and classes")
    for name in SHARED_FIELDS:
        values = {getattr(config, name) for config in configs}
        if len(values) > 1:
            raise ValueError(f"batched configs must share {name}; got {sorted(values, key=str)}")
    if any(config.optimizer != "sgd" for config in configs):
        raise ValueError("batched training implements SGD only; run AdamW configurations one by one")
    if world_size() > 1:
        raise ValueError("batched training runs in one process: launch it without torchrun (or train one by one)")


def batchable_methods() -> list[str]:
    """The registered methods whose configurations train together."""
    return [name for name, method in METHODS.items() if method.batchable]
