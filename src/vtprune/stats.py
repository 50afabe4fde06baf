"""Per-call statistics: what was kept, at which stage, and what the method itself cost."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import torch


@dataclass
class ImageStats:
    candidates: int  # prunable visual tokens of the image (patches; no newline tokens, no registers)
    after_pre_llm: int  # patch tokens that entered the LLM (no registers, no newline tokens)
    registers: int = 0  # register tokens that entered the LLM with the image
    newlines: int = 0  # LLaVA-NeXT newline tokens that entered the LLM with the image
    info: dict = field(default_factory=dict)
    _cells: dict = field(default_factory=dict, repr=False)
    _owner: "CallStats | None" = field(default=None, repr=False)

    @property
    def entering_cells(self) -> list[tuple[int, int, int]]:
        """(crop, row, col) of the patches that entered the LLM (computed when first read)."""
        return self._cell_list("entering_cells")

    @property
    def kept_cells(self) -> list[tuple[int, int, int]]:
        """(crop, row, col) of the patches that remained after in-LLM pruning."""
        return self._cell_list("kept_cells")

    def _cell_list(self, name: str) -> list:
        if self._owner is not None:
            self._owner.resolve()
        return self._cells.get(name, [])

    @property
    def visual_tokens(self) -> int:
        """Every visual token of the image that entered the LLM: patches, registers, newline tokens."""
        return self.after_pre_llm + self.registers + self.newlines


@dataclass
class CallStats:
    """One pruned prefill.

    images:       per image, in the order they appear in the batch.
    llm_stages:   per sample, {layer: visual tokens kept from that layer on} (in-LLM methods).
    method_seconds: wall time spent inside the method's selection code (GPU synchronised).
    total_seconds:  wall time of the whole prefill call, model included.
    """

    method: str
    positions: str = "original"  # "original" or "contiguous": how the LLM numbered the pruned sequence
    images: list[ImageStats] = field(default_factory=list)
    llm_stages: dict[int, dict[int, int]] = field(default_factory=dict)
    llm_info: dict[int, dict[int, dict]] = field(default_factory=dict)  # method info per sample and layer
    method_seconds: float = 0.0
    total_seconds: float = 0.0
    #: what the pipeline left to compute when someone reads it (columns, cells): the prefill does not
    #: pay for converting index tensors to lists that nobody reads
    _pending: Callable[["CallStats"], None] | None = field(default=None, repr=False)
    _columns: dict = field(default_factory=dict, repr=False)

    def defer(self, compute: Callable[["CallStats"], None]) -> None:
        """Run ``compute(self)`` when a column or cell list is first read; it fills them with
        :meth:`set_columns` and ``ImageStats.set_cells``."""
        self._pending = compute
        for im in self.images:
            im._owner = self

    def resolve(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending(self)

    def set_columns(self, name: str, value) -> None:
        self._columns[name] = value

    @property
    def kept_columns(self) -> list[list[int]]:
        """Per sample, the input columns whose visual tokens remained after every stage (registers,
        which have no input column of their own, show as the column of the image's last unit)."""
        self.resolve()
        return self._columns.get("kept_columns", [])

    @property
    def entering_columns(self) -> list[list[int]]:
        """The same for the visual tokens that entered the LLM (before in-LLM pruning)."""
        self.resolve()
        return self._columns.get("entering_columns", [])

    @property
    def stage_columns(self) -> dict[int, list[list[int]]]:
        """In-LLM methods: {layer: per sample, the input columns whose visual tokens remain from that
        layer on}."""
        self.resolve()
        return self._columns.get("stage_columns", {})

    @contextlib.contextmanager
    def timer(self):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.method_seconds += time.perf_counter() - start

    def add_llm_stage(self, sample: int, layer: int, kept: int, info: dict | None = None) -> None:
        self.llm_stages.setdefault(sample, {})[layer] = kept
        if info:
            self.llm_info.setdefault(sample, {})[layer] = info

    @property
    def tokens_entering_llm(self) -> list[int]:
        """Visual tokens per image that entered the LLM: every one of them, registers and LLaVA-NeXT
        newline tokens included (``images[i].after_pre_llm`` counts the patches alone)."""
        return [im.visual_tokens for im in self.images]

    @property
    def patches_entering_llm(self) -> list[int]:
        """Patch tokens per image that entered the LLM (no registers, no newline tokens)."""
        return [im.after_pre_llm for im in self.images]

    def layer_averaged(self, num_layers: int, sample_images: list[list[int]] | None = None) -> list[float]:
        """Per sample: its visual tokens (registers and newline tokens included) averaged over the
        decoder's layers (equals the entering count for pre-LLM methods). ``sample_images`` maps
        samples to their images (default: one each)."""
        groups = sample_images or [[i] for i in range(len(self.images))]
        out = []
        for b, imgs in enumerate(groups):
            entering = sum(self.images[i].visual_tokens for i in imgs)
            never_pruned = sum(self.images[i].registers + self.images[i].newlines for i in imgs)
            stages = sorted(self.llm_stages.get(b, {}).items())
            total, current, start = 0.0, entering, 0
            for layer, kept in stages:
                total += current * (layer - start)
                current, start = kept + never_pruned, layer
            total += current * (num_layers - start)
            out.append(total / num_layers)
        return out

    def as_dict(self) -> dict:
        self.resolve()
        out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        out["images"] = [{**{f.name: getattr(im, f.name) for f in fields(im) if not f.name.startswith("_")},
                          "entering_cells": im.entering_cells, "kept_cells": im.kept_cells} for im in self.images]
        return {**out, "kept_columns": self.kept_columns, "entering_columns": self.entering_columns,
                "stage_columns": self.stage_columns}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
