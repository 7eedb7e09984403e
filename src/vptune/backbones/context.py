"""What a served model keeps of its prompts between batches: the keys and values of the prompts that take part in
attention as keys and values alone (VPT-Deep's), which do not depend on the image."""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..prompts import Prompts


class ContextCache:
    """The keys and values of prompts that take part as keys and values alone (VPT-Deep's), per task row and block,
    for serving: they do not depend on the image, so each task's are computed on its first batch and kept, for at
    most ``rows`` task rows (the least recently used dropped). A row written anew must be :meth:`forget`-ed.

    A batch says its task rows first (:meth:`prepare`, on the CPU: the bookkeeping never waits for the device).
    Only a frozen model in eval mode uses it, and only where the family's blocks answer ``context_key_values``; a
    batch with more distinct tasks than ``rows`` computes them as usual.
    """

    def __init__(self, rows: int = 256):
        if rows < 1:
            raise ValueError(f"ContextCache: rows must be >= 1, got {rows}")
        self.rows = rows
        self.computed = 0  # (task row, block) pairs computed: what a test counts
        self.clear()

    def clear(self) -> None:
        """Drop every cached key and value (after the model moved to another device or dtype)."""
        self._where: OrderedDict[int, int] = OrderedDict()  # task row -> cache row, least recently used first
        self._free = list(range(self.rows - 1, -1, -1))  # cache rows holding no task row
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block -> keys, values (rows, n, d)
        self._filled: dict[int, torch.Tensor] = {}  # block -> which cache rows hold keys and values (CPU)
        self._batch: tuple[torch.Tensor, list[int]] | None = None

    def forget(self, task_row: int) -> None:
        """Task row ``task_row`` holds other tensors now: its keys and values are computed again on its next use."""
        place = self._where.pop(task_row, None)
        if place is not None:
            self._unfill(place)
            self._free.append(place)

    def prepare(self, task_rows: list[int]) -> None:
        """The task rows of the next batch's samples (None after it: :meth:`done`)."""
        distinct = list(dict.fromkeys(task_rows))
        if len(distinct) > self.rows:
            self._batch = None
            return
        for task in distinct:
            if task in self._where:
                self._where.move_to_end(task)
        for task in distinct:
            if task not in self._where:
                place = self._free.pop() if self._free else self._where.popitem(last=False)[1]
                self._unfill(place)
                self._where[task] = place
        self._batch = (torch.tensor([self._where[task] for task in task_rows], dtype=torch.long), task_rows)

    def done(self) -> None:
        self._batch = None

    def key_values(
        self, backbone, prompts: Prompts, index: int, task_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Block ``index``'s prompt keys and values per sample, ((B, n, d), (B, n, d)), or None where not cached."""
        batch = self._batch
        if batch is None or task_ids is None or len(batch[1]) != task_ids.shape[0]:
            return None
        if prompts.training or torch.is_grad_enabled():
            return None
        places, task_rows = batch
        filled = self._filled.setdefault(index, torch.zeros(self.rows, dtype=torch.bool))
        missing = torch.unique(places[~filled[places]])
        device = task_ids.device
        if missing.numel():
            owner = {place: task for task, place in self._where.items()}
            rows = torch.tensor([owner[place] for place in missing.tolist()], dtype=torch.long, device=device)
            pair = backbone.context_key_values(index, prompts.tokens(index, rows, backbone, len(rows)))
            if pair is None:
                return None
            if index not in self._tables:
                self._tables[index] = tuple(t.new_empty(self.rows, *t.shape[1:]) for t in pair)  # read once filled
            keys, values = self._tables[index]
            where = missing.to(device)
            keys[where], values[where] = pair
            filled[missing] = True
            self.computed += missing.numel()
        keys, values = self._tables[index]
        where = places.to(device)
        return keys[where], values[where]

    def _unfill(self, place: int) -> None:
        for filled in self._filled.values():
            filled[place] = False
