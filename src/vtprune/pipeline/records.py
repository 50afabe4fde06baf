"""The deferred statistics of a prefill: column and cell lists, computed when someone reads them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..stats import CallStats
from .layout import Layout


@dataclass
class ColumnRecord:
    """Fills a call's column and cell lists when someone reads them (``CallStats.defer``): the
    prefill keeps only the small CPU index tensors it needs, never the images' features."""

    source_columns: list[tuple[int, torch.Tensor]]  # per sample: (left pad, input column of each compact slot)
    entering: Callable[[], Layout]  # builds (or returns) the layout entering the LLM
    final: Layout | None  # the layout after the last in-LLM stage (None: the entering one)
    after_stage: dict[int, Layout]
    span_units: list[list[tuple[int, int]]]  # per sample: (start, n_units) of each image
    unit_cells: list[torch.Tensor | None]  # per image: (crop, row, col) of each unit

    def __call__(self, stats: CallStats) -> None:
        entering_layout = self.entering()
        final_layout = self.final if self.final is not None else entering_layout
        stats.set_columns("entering_columns", self.columns(entering_layout))
        stats.set_columns("kept_columns", self.columns(final_layout))
        stats.set_columns("stage_columns", {K: self.columns(layout) for K, layout in self.after_stage.items()})
        entering, kept = self.columns(entering_layout, registers=False), self.columns(final_layout, registers=False)
        k = 0
        for b, units in enumerate(self.span_units):
            for start, n_units in units:
                cells, im_stats = self.unit_cells[k], stats.images[k]
                k += 1
                if cells is None:
                    continue
                for name, cols in (("entering_cells", entering[b]), ("kept_cells", kept[b])):
                    im_stats._cells[name] = cells_of(cells, [c - start for c in cols if start <= c < start + n_units])

    def columns(self, layout: Layout, registers: bool = True) -> list[list[int]]:
        """Per sample, the columns of the (full-layout) input sequence whose visual tokens remain (a
        register shows as the column of its image's last unit; ``registers=False`` leaves them out, so
        that a register does not count as that unit)."""
        out = []
        for b, (pad, cols) in enumerate(self.source_columns):
            parts = [layout.candidates[b], layout.fixed[b]] + ([layout.protected[b]] if registers else [])
            compact = torch.cat(parts).sort().values - pad
            out.append(cols[compact].tolist())
        return out


def cells_of(unit_cells: torch.Tensor, units: list[int]) -> list[tuple[int, int, int]]:
    """The (crop, row, col) of the given units, newline tokens (crop -1) left out."""
    cells = unit_cells.cpu()[torch.tensor(units, dtype=torch.long)] if units else unit_cells[:0]
    return [tuple(c) for c in cells.tolist() if c[0] >= 0]
