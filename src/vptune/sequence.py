"""Token sequences (B, T, d): a range of positions split out, or dropped."""

from __future__ import annotations

import torch


def split_range(tokens: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tokens`` (B, T, d) as the pieces before ``start``, ``start..stop-1`` and from ``stop`` on.

    One split rather than slices: its backward concatenates the pieces' gradients (zeros only for an unused piece),
    where every slice's backward would zero-fill and add a whole sequence-sized gradient.
    """
    return tokens.split([start, stop - start, tokens.shape[1] - stop], dim=1)


def drop_tokens(tokens: torch.Tensor, skip: tuple[int, int] | None) -> torch.Tensor:
    """``tokens`` (B, T, d) without positions ``skip[0]..skip[1]-1`` (all of them where ``skip`` is None)."""
    if skip is None:
        return tokens
    before, _, after = split_range(tokens, *skip)
    return after if not before.shape[1] else before if not after.shape[1] else torch.cat([before, after], dim=1)
