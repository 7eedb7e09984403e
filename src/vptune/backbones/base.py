"""What every backbone family answers, and the behaviour built on it.

A family is a subclass in a module of its own. It says where its model keeps each part and answers one protocol:
the network as ``embed`` -> blocks (``run_block``) -> features, and how prompts enter it (which prompts it takes,
its defaults for them, how its prompted features are computed). Code above ``backbones/`` asks only this protocol
and never which family it holds.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..prompts import PromptConfig, PromptModule

if TYPE_CHECKING:
    from .context import ContextCache


@dataclass(frozen=True)
class PromptPass:
    """What one prompted forward runs with.

    Attributes:
        config: the resolved prompt configuration (its read-out counts even without prompts).
        prompts: the model's prompts, or None.
        task_ids: each sample's task (row of the prompts), or None for a one-task model.
        recompute: blocks before this one are recomputed in the backward pass (gradient checkpointing).
        skip_unread: compute no block output that nothing reads (False: every output, the reference).
        cache: where a served model keeps the keys and values of prompts that enter as keys and values alone
            (:class:`~vptune.backbones.context.ContextCache`), or None: computed in every batch.
    """

    config: PromptConfig
    prompts: PromptModule | None = None
    task_ids: torch.Tensor | None = None
    recompute: int = 0
    skip_unread: bool = True
    cache: ContextCache | None = None


class Backbone(nn.Module):
    """A frozen pretrained network seen as: an embedding, a list of blocks, a final norm and read-out.

    The surface every family provides:

    - ``embed(pixel_values)``: what enters block 0 (a Transformer's tokens with positions, a ConvNet's stem output);
      ``run_block(index, hidden)``: block ``index`` alone, no prompts; ``blocks``, ``norm``, ``patch_embed``.
    - Prompting: :meth:`resolve_prompt` (the family's defaults filled in, what it cannot take refused, once, in
      :func:`vptune.build`), :meth:`new_prompts` (the kind of :class:`~vptune.prompts.PromptModule` it takes),
      :meth:`prompted_backbone` (itself, or a copy the prompts change), :meth:`prompted_input` and
      :meth:`prompted_features` (the prompted forward: a flat token sequence, staged windows, a pixel border).
    - What methods may ask of its blocks, ``capabilities``: with ``"tokens"`` (a Transformer, :class:`TokenBackbone`)
      also ``mlp_output(i)`` and ``attention_projections(i)``, where adapters and LoRA go.

    Attributes:
        spec: how the backbone was asked for (``"dinov2-small"``, ``"hf:..."``); recorded in task files.
        family: the adapter's name (``"vit"``, ``"dinov2"``, ``"resnet"`` ...).
        width: the feature width d the head reads.
        depth: number of blocks N (a ConvNet's: stages).
        patch_size: patch side s in pixels (1 for a ConvNet).
        num_prefix_tokens: class token plus any register tokens in front of the patch tokens (0 without).
        in_chans: input channels.
        image_size: native input side.
        mean, std: the normalisation the backbone was pretrained with.
        tuned_parameters: pretrained parameters that a method's private copy trains (see :meth:`own_copy`).
    """

    family: ClassVar[str] = "base"
    kind: ClassVar[str] = "a Transformer"  # what it is, in messages
    model_types: ClassVar[tuple[str, ...]] = ()  # transformers ``config.model_type`` values this family loads
    model_classes: ClassVar[tuple[str, ...]] = ()  # transformers model classes this family wraps
    default_mean: ClassVar[tuple[float, ...]] = IMAGENET_MEAN
    default_std: ClassVar[tuple[float, ...]] = IMAGENET_STD
    load_options: ClassVar[dict] = {}  # keyword arguments of ``from_pretrained``
    # What its blocks offer the methods (``Method.needs``): "tokens", a Transformer's tokens and its blocks' parts
    capabilities: ClassVar[frozenset[str]] = frozenset({"tokens"})
    block_unit: ClassVar[str] = "blocks"  # what its blocks are called in messages
    prompt_hint: ClassVar[str] = ""  # how to prompt it, where the token methods do not apply

    def __init__(self, model: nn.Module, spec: str, mean: Sequence[float], std: Sequence[float], image_size: int):
        super().__init__()
        self.model = model
        self.spec = spec
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_size = int(image_size)
        config = self.config_of(model)
        self.width, self.depth, self.patch_size = self.dimensions(config)
        self.in_chans = int(getattr(config, "num_channels", 3))
        self.num_prefix_tokens = 1
        self._fingerprint: str | None = None
        self._num_parameters = sum(p.numel() for p in model.parameters())
        self.tuned_parameters = 0
        self.dropout_in_training = False  # full fine-tuning keeps the model's own dropout (see own_copy)
        model.requires_grad_(False)
        self.train(False)

    # --- where the family's model keeps each part ---------------------------------------------------------------
    @classmethod
    def config_of(cls, model: nn.Module):
        """The model's configuration as the methods below read it (a transformers model's ``config``)."""
        return model.config

    @classmethod
    def dimensions(cls, config) -> tuple[int, int, int]:
        """Width d, depth N and patch side s from a transformers config."""
        return int(config.hidden_size), int(config.num_hidden_layers), int(config.patch_size)

    @classmethod
    def native_size(cls, config) -> int:
        """The input side the family's preprocessing uses, from a transformers config."""
        return int(config.image_size)

    @classmethod
    def load_model(cls, source: str, dtype: torch.dtype) -> nn.Module:
        """The transformers model in ``source`` (a Hub id or a local folder)."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(source, dtype=dtype, **cls.load_options)

    @property
    def patch_embed(self) -> nn.Conv2d:
        """The first convolution (a Transformer's patch embedding: kernel = stride = patch size)."""
        raise self._unanswered()

    @property
    def blocks(self) -> nn.ModuleList:
        """The blocks (a ConvNet's stages), in order."""
        raise self._unanswered()

    @property
    def norm(self) -> nn.Module:
        """The final norm."""
        raise self._unanswered()

    def block_width(self, index: int) -> int:
        """Block ``index``'s width (the same for every block of a plain ViT)."""
        return self.width

    def num_patches(self, image_size: int) -> int:
        """Patch tokens for a square input of side ``image_size``."""
        return (image_size // self.patch_size) ** 2

    # --- the network without prompts ----------------------------------------------------------------------------
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) as what enters block 0."""
        raise self._unanswered()

    def run_block(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on what the block before it gave."""
        raise self._unanswered()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's own output (a Transformer: every token after the final norm; a ConvNet: pooled features)."""
        raise self._unanswered()

    # --- prompting: the one protocol ----------------------------------------------------------------------------
    def resolve_prompt(self, config: PromptConfig) -> PromptConfig:
        """``config`` with the family's defaults for what it leaves unset (``location``, ``readout``), or a
        ``ValueError`` saying why the family cannot take it and what to use instead. Idempotent."""
        raise self._unanswered()

    def new_prompts(
        self, config: PromptConfig, preprocessing: Preprocessing, generator: torch.Generator | None = None
    ) -> PromptModule | None:
        """The prompts of a resolved ``config`` on this family (None when it inserts none), drawn with ``generator``."""
        raise self._unanswered()

    def prompted_backbone(self, config: PromptConfig, generator: torch.Generator | None = None) -> Backbone:
        """The backbone a resolved ``config``'s prompts run on: this one, or a copy they change (an input layer
        widened for extra input channels, which then trains whole); tensors this backbone trains stay trained."""
        return self

    def prompted_input(self, pixel_values: torch.Tensor, run: PromptPass) -> torch.Tensor:
        """What enters block 0 with the prompts that enter before it (pixels around the image, extra channels)."""
        raise self._unanswered()

    def prompted_features(self, hidden: torch.Tensor, start: int, run: PromptPass) -> torch.Tensor:
        """Blocks ``start..N-1`` on ``hidden`` (:meth:`prompted_input`'s output for ``start`` 0, or a cached block
        input) with ``run``'s prompts, then the final norm and the read-out ``run.config.readout``: features (B, d)
        for the head."""
        raise self._unanswered()

    def context_key_values(self, index: int, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The keys and values block ``index``'s attention makes of ``context`` (tokens that take part as keys and
        values alone), for a served model to keep; None where the family does not say (then they are computed in
        every batch)."""
        return None

    def _unanswered(self) -> NotImplementedError:
        """The error of a protocol call a family does not answer, naming the call and how to answer it."""
        call = inspect.stack()[1].function
        return NotImplementedError(
            f"{type(self).__name__} ({self.family}) does not answer Backbone.{call}: a Transformer on tokens "
            "subclasses vptune.backbones.TokenBackbone, which answers the whole protocol; any other family provides "
            "each call (docs/design.md, 'Adding a backbone family')"
        )

    # --- shared behaviour ---------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Parameters of the pretrained backbone (modules a method inserts later are not counted)."""
        return self._num_parameters

    def train(self, mode: bool = True) -> Backbone:
        """The backbone stays in eval mode (its dropout off), whatever the mode of the model around it; a copy made
        with ``dropout_in_training`` (full fine-tuning) follows the model's mode, its own dropout as configured."""
        super().train(mode and self.dropout_in_training)
        return self

    def names_of(self, module: nn.Module) -> set[str]:
        """``named_parameters()`` names (relative to this backbone) of ``module``'s parameters."""
        ids = {id(p) for p in module.parameters()}
        return {name for name, p in self.named_parameters() if id(p) in ids}

    def own_copy(self, trains: Callable[[str], bool] = lambda name: False, dropout: bool = False) -> Backbone:
        """A copy for one model: frozen tensors shared, tensors named by ``trains`` copied and unfrozen.

        A method that changes the backbone's weights or computation works on such a copy, never on the backbone
        it was given (other tasks share it). ``trains(name)`` is asked for each ``named_parameters()`` name; with
        ``dropout`` the copy runs its own dropout while the model trains. The copy keeps this backbone's
        fingerprint: task files record the pretrained weights a task started from.
        """
        self.fingerprint()  # cached before copying, so the copy reports the pretrained weights
        chosen = {name for name, _ in self.named_parameters() if trains(name)}
        memo = {id(p): p for name, p in self.named_parameters() if name not in chosen}
        memo.update({id(b): b for b in self.buffers()})
        clone = copy.deepcopy(self, memo)
        for name, param in clone.named_parameters():
            param.requires_grad_(name in chosen)
        clone.tuned_parameters = sum(p.numel() for name, p in clone.named_parameters() if name in chosen)
        clone.dropout_in_training = dropout
        return clone

    def trained_names(self) -> set[str]:
        """The ``named_parameters()`` names of the tensors that train (those of a method's own copy)."""
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def fingerprint(self) -> str:
        """A SHA-256 over every weight's and buffer's name, shape, dtype and bytes (first 16 hex digits); cached."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                data = tensor.detach().to("cpu").contiguous()
                digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
                # reshape: a 0-dim tensor (a BatchNorm's batch counter) has no byte view of its own
                digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def record(self) -> dict:
        """What a task file stores about the backbone."""
        return {
            "spec": self.spec,
            "family": self.family,
            "fingerprint": self.fingerprint(),
            "width": self.width,
            "depth": self.depth,
            "patch_size": self.patch_size,
            "parameters": self.num_parameters(),
            "tuned_parameters": self.tuned_parameters,
        }

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, family={self.family}, width={self.width}, depth={self.depth}"
