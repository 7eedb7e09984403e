"""A tuned model: frozen backbone, optional prompts, a classification head; every method builds one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbones import Backbone, drop_tokens
from .head import Head
from .preprocessing import Preprocessing
from .prompts import PromptConfig, Prompts


def read_out(tokens: torch.Tensor, readout: str, num_prefix: int, num_prompts: int) -> torch.Tensor:
    """Pool normalised tokens ``[prefix, prompts, patches]`` into one feature vector per sample."""
    if readout == "cls":
        return tokens[:, 0]
    if readout == "image":
        return tokens[:, num_prefix + num_prompts :].mean(dim=1)
    if readout == "prompt":
        return tokens[:, num_prefix : num_prefix + num_prompts].mean(dim=1)
    return tokens[:, num_prefix:].mean(dim=1)  # "all": prompts and patches, not the class token (the released code)


def pool(backbone: Backbone, hidden: torch.Tensor, readout: str, num_prompts: int) -> torch.Tensor:
    """The final norm and the read-out on the last block's outputs: norm every token then pool, or, for a family
    that pools first (MAE's ``fc_norm``), pool then norm the pooled vector."""
    if backbone.pool_before_norm:
        return backbone.norm(read_out(hidden, readout, backbone.num_prefix_tokens, num_prompts))
    return read_out(backbone.norm(hidden), readout, backbone.num_prefix_tokens, num_prompts)


class TaskModel(nn.Module):
    """One task's model: ``model(pixel_values) -> logits``.

    The backbone is frozen and stays in eval mode; what trains is whatever the method left with
    ``requires_grad`` (prompts and head for VPT). ``task_ids`` (B,) selects each sample's prompts and head
    when the prompts and head hold several tasks. Built by :func:`vptune.build`; everything it records is given
    to the constructor.

    Args:
        backbone: the frozen backbone (or a method's own copy of it).
        num_classes: classes C (ignored when ``head`` is given).
        prompt: the prompts' configuration (``num_tokens=0``: none; ``readout`` unset: the family's default).
        preprocessing: how images become its input (an int: that input side, the backbone's normalisation).
        method: the registry name it was built with.
        options: the method's options, as recorded in task files.
        classes: class names, index = label (default ``"0"`` .. ``"C-1"``).
        head: the classifier (default a linear :class:`Head`).
        prompts: ready prompts (default: initialised from ``prompt``).
        generator: draws the initial prompts and head.
        head_init: how a new linear head starts (:class:`~vptune.head.Head`).
        head_norm: what a new head does to the features first (:class:`~vptune.head.Head`).
        skip_unread: compute no block outputs that nothing reads (False: every token of every block).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        prompt: PromptConfig,
        preprocessing: Preprocessing | int,
        *,
        method: str = "custom",
        options: dict | None = None,
        classes: list[str] | None = None,
        head: nn.Module | None = None,
        prompts: Prompts | None = None,
        generator: torch.Generator | None = None,
        head_init: str = "uniform",
        head_norm: str = "batchnorm",
        skip_unread: bool = True,
    ):
        super().__init__()
        if prompt.readout is None:
            prompt = dataclasses.replace(prompt, readout=backbone.default_readout)
        if isinstance(preprocessing, int):
            preprocessing = Preprocessing(preprocessing, backbone.mean, backbone.std)
        self.backbone = backbone
        self.method = method
        self.prompt_config = prompt
        self.preprocessing = preprocessing
        self.options = dict(options or {})
        if prompts is None and prompt.enabled:
            prompts = Prompts(prompt, backbone, preprocessing.image_size, generator=generator)
        self.prompts = prompts
        self.head_init, self.head_norm = head_init, head_norm
        if head is None:
            head = Head(backbone.width, num_classes, generator=generator, init=head_init, norm=head_norm)
        self.head: nn.Module = head
        self.classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names given for a model with {self.num_classes} classes")
        self.skip_unread = skip_unread
        self._recompute = 0  # blocks recomputed in the backward pass (see recomputing)

    @property
    def image_size(self) -> int:
        """The input side it was built for."""
        return self.preprocessing.image_size

    @contextmanager
    def recomputing(self, blocks: int) -> Iterator[None]:
        """Gradient checkpointing of the first ``blocks`` blocks (0: none) while the context lasts.

        The first blocks are the ones to recompute: their recomputation runs late in the backward pass, when most
        saved activations are already freed, so it does not add to the peak.
        """
        previous, self._recompute = self._recompute, blocks
        try:
            yield
        finally:
            self._recompute = previous

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward_features(self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled features after the final norm, (B, d)."""
        prompts = self.prompts
        delta = prompts.patch_delta(task_ids, pixel_values) if prompts is not None else None
        return self.features_from(self.backbone.embed(pixel_values, patch_delta=delta), 0, task_ids)

    def features_from(self, hidden: torch.Tensor, start: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run blocks ``start..N-1`` (with prompts), the final norm and the read-out on ``hidden``."""
        backbone, prompts = self.backbone, self.prompts
        layers = prompts.layers if prompts is not None else []
        if backbone.staged:
            return self._staged_features(hidden, start, task_ids, layers)
        num_prompts = 0
        for index in range(start, backbone.depth):
            context = self._prompt_context(index, hidden, num_prompts, task_ids, layers) if index in layers else None
            if index in layers and context is None:
                hidden, num_prompts = prompts.apply(index, hidden, num_prompts, task_ids, backbone)
            skip = self._unread(index, hidden.shape[1], num_prompts, layers) if self.skip_unread else None
            kv = prompts.key_values(index, task_ids, hidden.shape[0]) if index in layers else None
            hidden = self._run_block(index, hidden, skip, context, kv)
            if skip is not None:
                num_prompts = 0  # the prompts' outputs, never read, were not computed
            elif self.prompt_config.drop_after and layers and index == layers[-1]:
                prefix = backbone.num_prefix_tokens  # (skip_unread off: the prompts' outputs were computed)
                hidden, num_prompts = drop_tokens(hidden, (prefix, prefix + num_prompts)), 0
        return pool(backbone, hidden, self.prompt_config.readout, num_prompts)

    def _staged_features(
        self, hidden: torch.Tensor, start: int, task_ids: torch.Tensor | None, layers: list[int]
    ) -> torch.Tensor:
        """A family with its own prompted forward (Swin): each prompted block's tokens, handed over by block."""
        batch, config = hidden.shape[0], self.prompt_config
        fresh = {i: self.prompts.tokens(i, task_ids, self.backbone, batch) for i in layers if i >= start}
        kv = {i: self.prompts.key_values(i, task_ids, batch) for i in layers if i >= start and config.kv_tokens}
        drop_after = layers[-1] if config.drop_after and layers else None
        return self.backbone.staged_features(hidden, start, fresh, config.readout, drop_after, self._recompute, kv)

    def _unread(self, index: int, length: int, num_prompts: int, layers: list[int]) -> tuple[int, int] | None:
        """Tokens whose outputs of block ``index`` nothing reads, as a ``(start, stop)`` range, or None.

        With the ``cls`` read-out, the last block's outputs are read for the class token alone; a block's prompt
        outputs are discarded when the next block inserts fresh prompts (VPT-Deep) or when ``drop_after`` removes
        them after the last prompted block.
        """
        prefix, config = self.backbone.num_prefix_tokens, self.prompt_config
        if index == self.backbone.depth - 1 and config.readout == "cls":
            return (1, length)
        replaced = index + 1 in layers or (config.drop_after and bool(layers) and index == layers[-1])
        return (prefix, prefix + num_prompts) if num_prompts and replaced else None

    def _prompt_context(
        self, index: int, hidden: torch.Tensor, num_prompts: int, task_ids: torch.Tensor | None, layers: list[int]
    ) -> torch.Tensor | None:
        """Block ``index``'s prompts as keys and values alone, when nothing reads their outputs; else None (inserted).

        Then the sequence never holds them: no concatenation per block, and the same logits and gradients.
        """
        config, prefix = self.prompt_config, self.backbone.num_prefix_tokens
        if not self.skip_unread or num_prompts or config.location not in ("prepend", "prepend-pixel"):
            return None
        unread = self._unread(index, hidden.shape[1] + config.num_tokens, config.num_tokens, layers)
        if unread is None or not unread[0] <= prefix < prefix + config.num_tokens <= unread[1]:
            return None
        return self.prompts.tokens(index, task_ids, self.backbone, hidden.shape[0]).to(hidden.dtype)

    def _run_block(
        self,
        index: int,
        hidden: torch.Tensor,
        skip: tuple[int, int] | None,
        context: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        args = (index, hidden, skip, context) + ((kv,) if kv is not None else ())  # a family without kv: its own
        if index < self._recompute and torch.is_grad_enabled():
            return checkpoint(self.backbone.run_block, *args, use_reentrant=False)
        return self.backbone.run_block(*args)

    def forward(
        self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None, *, start: int = 0
    ) -> torch.Tensor:
        """Logits (B, C). With ``start`` > 0 the input is :meth:`trunk`'s output at that point, not pixels."""
        if start:
            return self.forward_from(pixel_values, start, task_ids)
        return self.head(self.forward_features(pixel_values, task_ids), task_ids)

    # --- the cached frozen trunk ---------------------------------------------------------------
    def cache_point(self) -> int:
        """Where trained computation starts: 0 (the embedding) .. N (the final norm), N + 1 (the head only).

        Everything before it is frozen and prompt-free, so its output per image never changes while training:
        :meth:`trunk` computes it once and :meth:`forward_from` continues from it.
        """
        backbone, point = self.backbone, self.backbone.depth + 1
        if self.prompts is not None:
            has_delta = self.prompt_config.location in ("prepend-pixel", "concat-channel")
            point = 0 if has_delta else min(point, self.prompts.layers[0])
        if any(p.requires_grad for p in backbone.norm.parameters()):
            point = min(point, backbone.depth)
        trains = [any(p.requires_grad for p in block.parameters()) for block in backbone.blocks]
        point = min(point, trains.index(True)) if True in trains else point
        inside = {id(p) for p in backbone.blocks.parameters()} | {id(p) for p in backbone.norm.parameters()}
        if any(p.requires_grad for p in backbone.parameters() if id(p) not in inside):
            point = 0  # the embedding (patch, class token, positions, registers) trains
        return point

    @torch.no_grad()
    def trunk(self, pixel_values: torch.Tensor, point: int) -> torch.Tensor:
        """The frozen stretch's output: tokens entering block ``point``, or pooled features when ``point`` is N + 1."""
        backbone = self.backbone
        hidden = backbone.embed(pixel_values)
        pooled = point > backbone.depth and self.skip_unread  # then only the read-out's tokens leave the last block
        pooled = pooled and not backbone.staged
        for index in range(min(point, backbone.depth)):
            hidden = backbone.run_block(index, hidden, self._unread(index, hidden.shape[1], 0, []) if pooled else None)
        if point <= backbone.depth:
            return hidden
        if backbone.staged:
            return self.features_from(hidden, backbone.depth)  # the family's own norm and read-out
        return pool(backbone, hidden, self.prompt_config.readout, 0)

    def forward_from(self, cached: torch.Tensor, point: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from :meth:`trunk`'s output at ``point``; equals ``self(pixel_values)`` for that input."""
        if point > self.backbone.depth:
            return self.head(cached, task_ids)
        return self.head(self.features_from(cached, point, task_ids), task_ids)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors that train."""
        return {name: param.detach() for name, param in self.named_parameters() if param.requires_grad}

    def task_state_dict(self) -> dict[str, torch.Tensor]:
        """What a task file stores: the tensors that train, and the buffers training updates outside the frozen
        backbone (an MLP head's batch-norm statistics)."""
        buffers = {name: buffer.detach() for name, buffer in self.named_buffers() if not name.startswith("backbone.")}
        return {**self.trainable_state_dict(), **buffers}

    @property
    def classifier(self) -> Head:
        """The last linear layer: the head itself, or an MLP head's output layer."""
        return [module for module in self.head.modules() if isinstance(module, Head)][-1]

    def num_trainable(self) -> int:
        """Trainable parameters (prompts, projection, head, and anything else the method unfroze)."""
        return sum(param.numel() for param in self.parameters() if param.requires_grad)
