"""transformers ``SwinModel``: a hierarchical Transformer of shifted-window blocks, with VPT as the paper applies it.

Swin has no class token, stages of growing width and patch merging between them, so a prompted forward cannot run
its blocks one by one on a flat ``[prefix, prompts, patches]`` sequence: the family runs the whole prompted forward
itself (:meth:`SwinBackbone.prompted_features`). Its prompts (the paper's Sec. 4.3, as its released code has them):
p tokens beside the H*W patches; in every block they go through ``norm1`` with the patches, join every attention
window (seeing and seen by each of its tokens, whatever the shifted-window mask), their outputs are averaged over the
windows, and the residual and the MLP run on prompts and patches alike. Patch merging passes them on as 4 copies
(4C) through its norm and reduction. The block and the merging are restated here over the model's own modules
(q/k/v/o, the relative position bias, the norms, the MLP), so that with no prompts the output is the model's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..prompts import PromptConfig
from .base import PromptPass
from .loading import register_family
from .tokens import TokenBackbone, layout

SHIFT_MASK = -100.0  # what transformers (and the original Swin) add between tokens of different shifted regions


@register_family
class SwinBackbone(TokenBackbone):
    """Swin (V1): patch embedding, stages of shifted-window blocks with patch merging between them, a final norm.

    ``width`` is the last stage's (the features the head reads), ``depth`` the number of blocks over all stages;
    :meth:`block_width` gives each block's. Between blocks (``embed``, ``run_block``) the tokens are a grid
    (B, H, W, C). The read-out ``cls`` (there is no class token) is the model's pooled output: the mean of every
    token after the final norm, prompts included, as the released code.
    """

    family = "swin"
    model_types = ("swin",)
    model_classes = ("SwinModel",)
    block_classes = ("SwinLayer",)
    block_parts = layout(
        "layernorm_before", "layernorm_after", "attention.q_proj", "attention.k_proj", "attention.v_proj",
        "attention.o_proj",
    )  # fmt: skip

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.model.config
        self.num_prefix_tokens = 0
        self.window_size = int(config.window_size)
        self.stage_depths = [len(stage.blocks) for stage in self.model.encoder.layers]
        self.stage_widths = [int(config.embed_dim) * 2**i for i in range(len(self.stage_depths))]
        self.depth = sum(self.stage_depths)
        self._stage = [i for i, depth in enumerate(self.stage_depths) for _ in range(depth)]  # of each block
        self._position = [j for depth in self.stage_depths for j in range(depth)]  # in its stage

    @property
    def patch_embed(self) -> nn.Conv2d:
        return self.model.embeddings.patch_embeddings.projection

    @property
    def blocks(self) -> nn.ModuleList:
        return nn.ModuleList(block for stage in self.model.encoder.layers for block in stage.blocks)

    @property
    def norm(self) -> nn.Module:
        return self.model.layernorm

    def block_width(self, index: int) -> int:
        """Block ``index``'s token width: its stage's, C0 * 2^stage."""
        return self.stage_widths[self._stage[index]]

    def resolve_prompt(self, config: PromptConfig) -> PromptConfig:
        """Swin takes prompt tokens (``location="prepend"``) stored at each block's own width: no projection."""
        if config.location not in (None, "prepend"):
            raise ValueError(
                f"PromptConfig: location {config.location!r} is not available on Swin; its prompts are tokens "
                "inside every attention window: use location='prepend'"
            )
        if config.project:
            raise ValueError("PromptConfig: project is not available on Swin (its blocks differ in width): use 0")
        return super().resolve_prompt(config)

    def embed(self, pixel_values: torch.Tensor, patch_delta: torch.Tensor | None = None) -> torch.Tensor:
        """The patch tokens as a grid (B, H/s, W/s, C0): patch embedding, its norm (and positions where the model
        has them)."""
        if patch_delta is not None:
            raise ValueError("Swin takes no patch delta: its prompts are tokens (location 'prepend')")
        dtype = self.patch_embed.weight.dtype
        tokens, (height, width) = self.model.embeddings(pixel_values.to(dtype), interpolate_pos_encoding=True)
        return tokens.unflatten(1, (height, width))

    def run_block(
        self,
        index: int,
        tokens: torch.Tensor,
        skip: tuple[int, int] | None = None,
        context: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Block ``index`` on a grid (B, H, W, C), with the patch merging after it where its stage ends."""
        if skip is not None or context is not None or kv is not None:
            raise ValueError("Swin blocks run on whole grids here: prompts go through prompted_features")
        patches, _, dims = self._step(index, tokens.flatten(1, 2), None, tuple(tokens.shape[1:3]))
        return patches.unflatten(1, dims)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm, (B, #tokens of the last stage, C): the model's ``last_hidden_state``."""
        grid = self.embed(pixel_values)
        for index in range(self.depth):
            grid = self.run_block(index, grid)
        return self.norm(grid.flatten(1, 2))

    def prompted_input(self, pixel_values: torch.Tensor, run: PromptPass) -> torch.Tensor:
        return self.embed(pixel_values)

    def prompted_features(self, hidden: torch.Tensor, start: int, run: PromptPass) -> torch.Tensor:
        """Blocks ``start..N-1`` with prompts, the final norm and the read-out: pooled features (B, d).

        ``hidden`` is the grid entering block ``start``, (B, H, W, C). Each prompted block's tokens (1 or B, p,
        C_block) replace the prompts there (VPT-Deep's); key-value prompts join every window's keys and values
        (E2VPT's); ``drop_after`` removes the prompts after the last prompted block. The read-out ``cls`` or
        ``all`` is every token's mean (the released code), ``image`` the patches', ``prompt`` the prompts'.
        Every block runs whole: Swin has no unread outputs to skip.
        """
        prompts, config, task_ids = run.prompts, run.config, run.task_ids
        layers = [i for i in (prompts.layers if prompts is not None else []) if i >= start]
        batch = hidden.shape[0]
        fresh = {i: prompts.tokens(i, task_ids, self, batch) for i in layers}
        kv = {i: prompts.key_values(i, task_ids, batch) for i in layers if config.kv_tokens}
        drop_after = prompts.layers[-1] if prompts is not None and config.drop_after else None
        patches, dims, tokens = hidden.flatten(1, 2), tuple(hidden.shape[1:3]), None
        for index in range(start, self.depth):
            tokens = fresh.get(index, tokens)
            step = (index, patches, tokens, dims, kv.get(index))
            if index < run.recompute and torch.is_grad_enabled():
                patches, tokens, dims = checkpoint(self._step, *step, use_reentrant=False)
            else:
                patches, tokens, dims = self._step(*step)
            tokens = None if index == drop_after else tokens
        return self._read_out(patches, tokens, config.readout)

    def _read_out(self, patches: torch.Tensor, prompts: torch.Tensor | None, readout: str) -> torch.Tensor:
        if readout == "image" or prompts is None:
            return self.norm(patches).mean(dim=1)
        if readout == "prompt":
            return self.norm(prompts).mean(dim=1)
        return self.norm(torch.cat([prompts.expand(patches.shape[0], -1, -1), patches], dim=1)).mean(dim=1)

    def _step(
        self,
        index: int,
        patches: torch.Tensor,
        prompts: torch.Tensor | None,
        dims: tuple[int, int],
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Block ``index`` and, where its stage ends before the last, the stage's patch merging."""
        stage = self.model.encoder.layers[self._stage[index]]
        block = stage.blocks[self._position[index]]
        patches, prompts = prompted_block(block, patches, prompts, dims, self._window(index, dims), kv)
        if block is stage.blocks[-1] and stage.downsample is not None:
            return *merge_patches(stage.downsample, patches, prompts, dims), ((dims[0] + 1) // 2, (dims[1] + 1) // 2)
        return patches, prompts, dims

    def _window(self, index: int, dims: tuple[int, int]) -> tuple[int, int]:
        """Block ``index``'s window side and shift on a grid ``dims``; a grid no larger than the window is one
        unshifted window, as transformers does."""
        window = self.window_size
        if min(dims) < window:
            raise ValueError(
                f"Swin: stage {self._stage[index] + 1} sees a {dims[0]}x{dims[1]} grid, smaller than the window "
                f"({window}): use larger images (at least {window * self.patch_size * 2 ** self._stage[index]} "
                "pixels a side)"
            )
        return window, 0 if min(dims) == window or self._position[index] % 2 == 0 else window // 2


def prompted_block(
    block: nn.Module,
    patches: torch.Tensor,
    prompts: torch.Tensor | None,
    dims: tuple[int, int],
    window: tuple[int, int],
    kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A transformers ``SwinLayer`` on patches (B, H*W, C) and prompts (1 or B, p, C) or None.

    norm1 on both; the patches (padded to whole windows, cyclically shifted) split into windows, each window
    prefixed with its sample's prompts; windowed attention; the prompts' outputs averaged over the windows; the
    residual, then norm2 and the MLP, on prompts and patches alike. ``window``: (side, shift). ``kv``: key-value
    prompts ((1 or B, m, C) each), appended to every window's keys and values.
    """
    batch = patches.shape[0]
    normed = block.layernorm_before(patches).unflatten(1, dims)
    windows, padded = to_windows(normed, *window)
    count = windows.shape[0] // batch
    if prompts is not None:
        prompts = prompts.expand(batch, -1, -1)
        extra = block.layernorm_before(prompts).unsqueeze(1).expand(-1, count, -1, -1).flatten(0, 1)
        windows = torch.cat([extra, windows], dim=1)
    num_prompts = 0 if prompts is None else prompts.shape[1]
    attended = block.dropout(window_attention(block.attention, windows, padded, window, num_prompts, kv))
    extra, attended = attended.split([num_prompts, attended.shape[1] - num_prompts], dim=1)
    attended = from_windows(attended, padded, dims, *window).flatten(1, 2)
    if prompts is not None:  # each sample's prompt outputs: the mean over its windows
        attended = torch.cat([extra.unflatten(0, (batch, count)).mean(dim=1), attended], dim=1)
        patches = torch.cat([prompts, patches], dim=1)
    hidden = patches + block.drop_path(attended)
    hidden = hidden + block.dropout(block.mlp(block.layernorm_after(hidden)))
    if prompts is None:
        return hidden, None
    prompts, patches = hidden.split([num_prompts, hidden.shape[1] - num_prompts], dim=1)
    return patches, prompts


def to_windows(grid: torch.Tensor, side: int, shift: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """A grid (B, H, W, C) zero-padded to whole windows, rolled by -``shift``, as windows (B * nW, side², C) in
    sample-major order; also the padded grid's size."""
    height, width = grid.shape[1:3]
    grid = F.pad(grid, (0, 0, 0, -width % side, 0, -height % side))
    if shift:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    padded = tuple(grid.shape[1:3])
    rows, cols = padded[0] // side, padded[1] // side
    windows = grid.reshape(grid.shape[0], rows, side, cols, side, -1).transpose(2, 3)
    return windows.reshape(-1, side * side, grid.shape[-1]), padded


def from_windows(windows: torch.Tensor, padded: tuple[int, int], dims: tuple[int, int], side: int, shift: int):
    """The inverse of :func:`to_windows`: windows (B * nW, side², C) back to the grid (B, H, W, C)."""
    rows, cols = padded[0] // side, padded[1] // side
    grid = (
        windows.reshape(-1, rows, cols, side, side, windows.shape[-1])
        .transpose(2, 3)
        .reshape(-1, *padded, windows.shape[-1])
    )
    if shift:
        grid = torch.roll(grid, shifts=(shift, shift), dims=(1, 2))
    return grid[:, : dims[0], : dims[1]]


def window_attention(
    attention: nn.Module,
    windows: torch.Tensor,
    padded: tuple[int, int],
    window: tuple[int, int],
    num_prompts: int,
    kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """A ``SwinAttention`` on windows (B * nW, p + side², C) whose first ``num_prompts`` tokens are prompts.

    Scores get the relative position bias between patches and, for a shifted window, the mask between its regions;
    the prompts' rows and columns get neither (zero): they see and are seen by every token of the window. Laid out
    as transformers lays it out (one batch row per window), so that without prompts the numbers are its own.
    ``kv``: key-value prompts ((1 or B, m, C) each) after each window's keys and values, with no bias or mask.
    """
    count, length, _ = windows.shape
    mask = _window_bias(attention, padded, window, num_prompts, windows.dtype)  # (nW or 1, heads, L, L)
    if mask.shape[0] > 1:  # one mask per window, the same for every sample
        mask = mask.expand(count // mask.shape[0], -1, -1, -1, -1).flatten(0, 1)

    def split_heads(states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (-1, attention.head_dim)).transpose(1, 2)

    query, key, value = (split_heads(attention.get_submodule(f"{role}_proj")(windows)) for role in "qkv")
    if kv is not None:  # each sample's key-value prompts in each of its windows (window-major within a sample)
        extra = [split_heads(t.to(key.dtype)) for t in kv]
        extra = [t.expand(count, -1, -1, -1) if t.shape[0] == 1 else t.repeat_interleave(count // t.shape[0], 0)
                 for t in extra]  # fmt: skip
        key, value = torch.cat([key, extra[0]], dim=2), torch.cat([value, extra[1]], dim=2)
        mask = F.pad(mask, (0, extra[0].shape[2]))
    dropout = attention.attention_dropout if attention.training else 0.0
    out = F.scaled_dot_product_attention(query, key, value, mask, dropout_p=dropout, scale=attention.scaling)
    return attention.o_proj(out.transpose(1, 2).reshape(count, length, -1))


def _window_bias(
    attention: nn.Module, padded: tuple[int, int], window: tuple[int, int], num_prompts: int, dtype: torch.dtype
) -> torch.Tensor:
    """The additive score mask per window, (nW or 1, heads, p + side², p + side²), zero on prompt rows and columns."""
    side, shift = window
    bias = attention.relative_position_bias().to(dtype)  # (1, heads, side², side²)
    if shift:
        bias = bias + shift_mask(padded, side, shift, bias.device, dtype).unsqueeze(1)
    return F.pad(bias, (num_prompts, 0, num_prompts, 0))


def shift_mask(padded: tuple[int, int], side: int, shift: int, device: torch.device, dtype: torch.dtype):
    """(nW, side², side²): -100 between tokens that a shifted window brings together from different regions."""
    regions = [
        (torch.arange(size, device=device) >= size - side).long() + (torch.arange(size, device=device) >= size - shift)
        for size in padded
    ]
    labels = (regions[0][:, None] * 3 + regions[1][None, :]).to(dtype)[None, :, :, None]
    windows, _ = to_windows(labels, side, 0)
    windows = windows.squeeze(-1)
    different = windows.unsqueeze(1) != windows.unsqueeze(2)
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill(different, SHIFT_MASK)


def merge_patches(
    merging: nn.Module, patches: torch.Tensor, prompts: torch.Tensor | None, dims: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ``SwinPatchMerging``: each 2x2 neighbourhood's tokens side by side (4C), the prompts as 4 copies of
    themselves (4C), then its norm and its reduction to 2C."""
    grid = patches.unflatten(1, dims)
    grid = F.pad(grid, (0, 0, 0, dims[1] % 2, 0, dims[0] % 2))
    merged = torch.cat([grid[:, row::2, col::2] for col in range(2) for row in range(2)], dim=-1).flatten(1, 2)
    if prompts is None:
        return merging.reduction(merging.norm(merged)), None
    num_prompts = prompts.shape[1]
    merged = torch.cat([prompts.repeat(1, 1, 4).expand(merged.shape[0], -1, -1), merged], dim=1)
    out = merging.reduction(merging.norm(merged))
    prompts, patches = out.split([num_prompts, out.shape[1] - num_prompts], dim=1)
    return patches, prompts
