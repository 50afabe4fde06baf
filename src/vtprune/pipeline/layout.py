"""The token layout of a pruned prefill: which compact column sits at each slot, and what it holds.
All bookkeeping runs on small CPU index tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import EncodedImage

TEXT, CANDIDATE, REGISTER, NEWLINE = range(4)  # what a column of the compact sequence holds


@dataclass
class Layout:
    """Current token layout of the batch inside the decoder during a pruned prefill.

    index[b, j] = column of the compact prefill sequence at slot j (-1 = padding)."""

    index: torch.Tensor
    candidates: list[torch.Tensor]  # per sample, compact columns that are prunable visual tokens
    protected: list[torch.Tensor]  # per sample, visual columns that must stay (registers)
    fixed: list[torch.Tensor]  # per sample, visual columns that are never candidates (newline tokens)
    text_after: list[torch.Tensor]  # per sample, compact columns of the text after the last image

    @property
    def mask(self) -> torch.Tensor:
        return (self.index >= 0).long()


def left_pad(rows: list[torch.Tensor], fill) -> torch.Tensor:
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length) + tuple(rows[0].shape[1:]), fill, dtype=rows[0].dtype,
                     device=rows[0].device)
    for b, r in enumerate(rows):
        if len(r):
            out[b, length - len(r):] = r
    return out


def real_columns(real_row: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The columns in [start, stop) that are not padding (``real_row``: a CPU bool mask)."""
    return torch.arange(start, stop)[real_row[start:stop]]


def unit_kinds(im: EncodedImage, keep: torch.Tensor) -> torch.Tensor:
    """Per kept unit (``keep``: CPU indices into the image's units): candidate, register or newline."""
    kinds = torch.full_like(keep, CANDIDATE)
    if im.unit_cells is not None:
        inside = keep < im.n_units
        newline = torch.zeros_like(keep, dtype=torch.bool)
        newline[inside] = im.unit_cells.cpu()[keep[inside], 0] < 0
        kinds[newline] = NEWLINE
    if im.protected is not None:
        kinds[torch.isin(keep, im.protected.cpu())] = REGISTER
    return kinds


def first_real(mask: torch.Tensor) -> int:
    """The first non-padding column (LLaVA-NeXT flat layout only)."""
    nz = torch.nonzero(mask).flatten()
    return int(nz[0]) if len(nz) else len(mask)  # sync: once per sample, only when the layout was rewritten


def map_layout(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the slot in ``source`` of each entry of ``target`` (both hold compact columns, -1 =
    padding, ascending among valid entries). Padding maps to slot 0 (masked anyway). CPU tensors."""
    out = torch.zeros_like(target)
    for b in range(target.shape[0]):
        src, tgt = source[b], target[b]
        slot_of = torch.zeros(int(max(src.max(), tgt.max())) + 1, dtype=torch.long)
        valid = torch.nonzero(src >= 0).flatten()
        slot_of[src[valid]] = valid
        out[b] = torch.where(tgt >= 0, slot_of[tgt.clamp(min=0)], 0)
    return out
