"""A tuned model: frozen backbone, optional prompts, a classification head; every method builds one.

It knows no backbone family: what enters the network and how the prompted features are computed is the family's
(``Backbone.prompted_input``, ``Backbone.prompted_features``); what trains is whatever the method left with
``requires_grad``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .backbones import Backbone, PromptPass
from .backbones.context import ContextCache
from .head import HEAD_INIT, HEAD_NORM, Head
from .preprocessing import Preprocessing
from .prompts import PromptConfig, PromptModule


class TaskModel(nn.Module):
    """One task's model: ``model(pixel_values) -> logits``.

    The backbone is frozen and stays in eval mode; what trains is whatever the method left with
    ``requires_grad`` (prompts and head for VPT). ``task_ids`` (B,) selects each sample's prompts and head
    when the prompts and head hold several tasks. Built by :func:`vptune.build`; everything it records is given
    to the constructor.

    Args:
        backbone: the frozen backbone (or a method's own copy of it).
        num_classes: classes C (ignored when ``head`` is given).
        prompt: the prompts' configuration, resolved by the backbone's family (``Backbone.resolve_prompt``;
            ``num_tokens=0``: none).
        preprocessing: how images become its input (an int: that input side, the backbone's normalisation).
        method: the registry name it was built with.
        options: the method's options, as recorded in task files.
        classes: class names, index = label (default ``"0"`` .. ``"C-1"``).
        head: the classifier (default a linear :class:`Head`).
        prompts: ready prompts (default: the family's, initialised from ``prompt``).
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
        prompts: PromptModule | None = None,
        generator: torch.Generator | None = None,
        head_init: str = HEAD_INIT,
        head_norm: str = HEAD_NORM,
        skip_unread: bool = True,
    ):
        super().__init__()
        if not prompt.resolved:
            raise ValueError(
                "TaskModel: the prompt configuration leaves location or readout to the backbone's family: pass "
                "backbone.resolve_prompt(config), or build the model with vptune.build"
            )
        if isinstance(preprocessing, int):
            preprocessing = Preprocessing(preprocessing, backbone.mean, backbone.std)
        self.backbone = backbone
        self.method = method
        self.prompt_config = prompt
        self.preprocessing = preprocessing
        self.options = dict(options or {})
        self.prompts = prompts if prompts is not None else backbone.new_prompts(prompt, preprocessing, generator)
        self.head_init, self.head_norm = head_init, head_norm
        if head is None:
            head = Head(backbone.width, num_classes, generator=generator, init=head_init, norm=head_norm)
        self.head: nn.Module = head
        self.classes = list(classes) if classes is not None else [str(i) for i in range(self.num_classes)]
        if len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names given for a model with {self.num_classes} classes")
        self.skip_unread = skip_unread
        self.context_cache: ContextCache | None = None  # set by a server (MultiTask): prompt keys and values kept
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
        """Features for the head (B, d): after the final norm and the read-out."""
        hidden = self.backbone.prompted_input(pixel_values, self._pass(task_ids))
        return self.features_from(hidden, 0, task_ids)

    def features_from(self, hidden: torch.Tensor, start: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run blocks ``start..N-1`` (with prompts), the final norm and the read-out on ``hidden``."""
        return self.backbone.prompted_features(hidden, start, self._pass(task_ids))

    def _pass(self, task_ids: torch.Tensor | None, prompted: bool = True) -> PromptPass:
        prompts = self.prompts if prompted else None
        cache = self.context_cache if prompted else None
        return PromptPass(self.prompt_config, prompts, task_ids, self._recompute, self.skip_unread, cache)

    def forward(
        self, pixel_values: torch.Tensor, task_ids: torch.Tensor | None = None, *, start: int = 0
    ) -> torch.Tensor:
        """Logits (B, C). With ``start`` > 0 the input is :meth:`trunk`'s output at that point, not pixels."""
        if start:
            return self.forward_from(pixel_values, start, task_ids)
        return self.head(self.forward_features(pixel_values, task_ids), task_ids)

    # --- the cached frozen trunk ---------------------------------------------------------------
    def cache_point(self) -> int:
        """Where trained computation starts: 0 (the input) .. N (the final norm), N + 1 (the head only).

        Everything before it is frozen and prompt-free, so its output per image never changes while training:
        :meth:`trunk` computes it once and :meth:`forward_from` continues from it.
        """
        backbone, point = self.backbone, self.backbone.depth + 1
        if self.prompts is not None:
            point = self.prompts.entry_block
        if any(p.requires_grad for p in backbone.norm.parameters()):
            point = min(point, backbone.depth)
        trains = [any(p.requires_grad for p in block.parameters()) for block in backbone.blocks]
        point = min(point, trains.index(True)) if True in trains else point
        inside = {id(p) for p in backbone.blocks.parameters()} | {id(p) for p in backbone.norm.parameters()}
        if any(p.requires_grad for p in backbone.parameters() if id(p) not in inside):
            point = 0  # the embedding (patch, class token, positions, registers; a ConvNet's stem) trains
        return point

    @torch.no_grad()
    def trunk(self, pixel_values: torch.Tensor, point: int) -> torch.Tensor:
        """The frozen stretch's output: the input itself (``point`` 0), what enters block ``point``, or the
        features for the head when ``point`` is N + 1."""
        backbone = self.backbone
        if point == 0:
            return pixel_values
        hidden = backbone.embed(pixel_values)
        if point > backbone.depth:  # the family's own forward, with no prompts: the head's input
            return backbone.prompted_features(hidden, 0, self._pass(None, prompted=False))
        for index in range(point):
            hidden = backbone.run_block(index, hidden)
        return hidden

    def forward_from(self, cached: torch.Tensor, point: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from :meth:`trunk`'s output at ``point``; equals ``self(pixel_values)`` for that input."""
        if point == 0:
            return self(cached, task_ids)
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
