"""The token layout of a pruned prefill: which compact column sits at each slot, and what it holds.
All bookkeeping runs on small CPU index tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.base import CANDIDATE, NEWLINE, REGISTER, TEXT, EncodedImage


@dataclass
class Layout:
    """Current token layout of the batch inside the decoder during a pruned prefill.

    index[b, j] = column of the compact prefill sequence at slot j (-1 = padding, on the left)."""

    index: torch.Tensor
    candidates: list[torch.Tensor]  # per sample, compact columns that are prunable visual tokens
    protected: list[torch.Tensor]  # per sample, visual columns that must stay (registers)
    fixed: list[torch.Tensor]  # per sample, visual columns that are never candidates (newline tokens)
    text_after: list[torch.Tensor]  # per sample, compact columns of the text after the last image
    lengths: list[int]  # per sample, the slots that are not padding (the last ``lengths[b]``)

    @property
    def mask(self) -> torch.Tensor:
        return (self.index >= 0).long()

    @property
    def padded(self) -> bool:
        return min(self.lengths) < self.index.shape[1]


@dataclass
class SampleUnits:
    """What ``build_layout`` needs of one sample of the compact sequence: its length, and per image the
    slot where the image's kept units start and their kinds (``unit_kinds``)."""

    length: int
    images: list[tuple[int, torch.Tensor]]
    last_visual: int  # slot of the sample's last visual token (-1: none)


def build_layout(samples: list[SampleUnits]) -> Layout:
    """The layout of the compact sequence as the LLM first sees it (slot = compact column)."""
    lengths = [s.length for s in samples]
    width = max(lengths)
    pads = [width - n for n in lengths]
    by_kind = [slots_by_kind(s, pad) for s, pad in zip(samples, pads)]
    columns = torch.arange(width)
    index = (torch.where(columns >= torch.tensor(pads).unsqueeze(1), columns, -1) if max(pads)
             else columns.expand(len(samples), -1))
    return Layout(index=index, candidates=[k[0] for k in by_kind], protected=[k[1] for k in by_kind],
                  fixed=[k[2] for k in by_kind],
                  text_after=[torch.arange(s.last_visual + 1 + p, s.length + p) for s, p in zip(samples, pads)],
                  lengths=lengths)


def slots_by_kind(sample: SampleUnits, pad: int) -> tuple[torch.Tensor, ...]:
    """The sample's slots (after ``pad`` slots of padding) holding candidates, registers and newline
    tokens, ascending."""
    counts = [torch.bincount(kinds, minlength=4).tolist() for _, kinds in sample.images]  # host: CPU tensors
    if all(c[REGISTER] == 0 and c[NEWLINE] == 0 for c in counts):  # candidates only: each image's units in a row
        ranges = [torch.arange(start + pad, start + pad + len(kinds)) for start, kinds in sample.images]
        empty = torch.zeros(0, dtype=torch.long)
        return ranges[0] if len(ranges) == 1 else torch.cat(ranges) if ranges else empty, empty, empty
    # otherwise one stable sort of the kinds of every slot, split by their counts
    kinds = torch.full((sample.length,), TEXT)
    for start, unit_kind in sample.images:
        kinds[start:start + len(unit_kind)] = unit_kind
    order = torch.argsort(kinds, stable=True)
    if pad:
        order += pad
    by_kind = order.split(torch.bincount(kinds, minlength=4).tolist())  # host: CPU tensors
    return by_kind[CANDIDATE], by_kind[REGISTER], by_kind[NEWLINE]


def left_pad(rows: list[torch.Tensor], fill) -> torch.Tensor:
    length = max(len(r) for r in rows)
    if all(len(r) == length for r in rows):  # nothing to pad: one sample, or equal lengths
        return torch.stack(rows)
    out = torch.full((len(rows), length) + tuple(rows[0].shape[1:]), fill, dtype=rows[0].dtype,
                     device=rows[0].device)
    for b, r in enumerate(rows):
        if len(r):
            out[b, length - len(r):] = r
    return out


def real_columns(real_row: torch.Tensor, start: int, stop: int, padded: bool = True) -> torch.Tensor:
    """The columns in [start, stop) that are not padding (``real_row``: a CPU bool mask; ``padded``
    False: the caller knows there is none)."""
    columns = torch.arange(start, stop)
    return columns[real_row[start:stop]] if padded else columns


def newline_units(im: EncodedImage) -> int:
    """Newline tokens among an image's units: the units that own a position but are no candidates."""
    return im.n_units - im.candidates


def unit_kinds(im: EncodedImage, keep: torch.Tensor) -> torch.Tensor:
    """Per kept unit (``keep``: CPU indices into the image's units): candidate, register or newline."""
    if im.unit_kind is not None:
        return im.unit_kind[keep]
    kinds = torch.full_like(keep, CANDIDATE)
    if im.unit_cells is not None and newline_units(im):
        inside = keep < im.n_units
        newline = torch.zeros_like(keep, dtype=torch.bool)
        newline[inside] = im.unit_cells.cpu()[keep[inside], 0] < 0
        kinds[newline] = NEWLINE
    if im.protected is not None and len(im.protected):
        kinds[torch.isin(keep, im.protected.cpu())] = REGISTER
    return kinds


def first_real(mask: torch.Tensor) -> int:
    """The first non-padding column (LLaVA-NeXT flat layout only)."""
    nz = torch.nonzero(mask).flatten()
    return int(nz[0]) if len(nz) else len(mask)  # sync: once per sample, only when the layout was rewritten


def compose_gathers(gathers: list[torch.Tensor], padded: bool = True) -> list[torch.Tensor]:
    """``gathers[s]``: per row, the slots of the layout entering stage s that stage s kept (-1 =
    padding). Returns, per stage, the slot in the layout entering it of each slot of the final
    layout (padding maps to slot 0, masked anyway): one gather per stage, whatever the layer count.
    ``padded`` False: the final layout has no padding (then no slot of any stage maps to padding)."""
    if not padded:
        out = [gathers[-1]]
        for g in reversed(gathers[:-1]):
            out.append(g.gather(1, out[-1]))
        return out[::-1]
    valid = gathers[-1] >= 0
    slots = gathers[-1].clamp(min=0)
    out = [slots]
    for g in reversed(gathers[:-1]):
        slots = g.gather(1, slots).clamp(min=0)
        out.append(slots)
    return [torch.where(valid, s, 0) for s in reversed(out)]
