"""One pruned prefill: the vision side, the compact left-padded layout of text + kept image units, the
model's own forward (with the in-LLM stage when the method has one), the stats and the cache's session.

Everything of one call lives in a ``PrefillCall``, which the installation creates when the prefill starts and
drops when it returns or raises."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .._compat import output_cache
from ..methods.base import Instruction, Stage
from ..models.base import EncodedImage
from ..models.families import image_input_keys
from ..stats import CallStats, ImageStats
from .decode import Session
from .layout import (NEWLINE, Layout, SampleUnits, build_layout, first_real, left_pad, newline_units, real_columns,
                     unit_kinds)
from .positions import as_rows_or_none, contiguous_positions, contiguous_shift, rewritten_positions
from .records import ColumnRecord

if TYPE_CHECKING:
    from .installation import Installation


@dataclass
class PrefillCall:
    """Everything that belongs to one pruned prefill. The installation creates it when the prefill starts
    and drops it when the prefill returns or raises, so nothing of one call can leak into the next."""

    stats: CallStats
    layout: Layout | None = None  # the current layout inside the decoder (in-LLM methods)
    layer_kwargs: dict | None = None  # positions and mask of the current layout, for later layers
    stage_layouts: list[tuple[int, Layout]] = field(default_factory=list)  # layout entering each stage
    stage_gathers: list[torch.Tensor] = field(default_factory=list)  # per stage, the slots it kept (-1 = pad)
    recorders: dict = field(default_factory=dict)  # attention recorders per pruning layer
    source_columns: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (left pad, input columns)
    caller_positions: bool = False  # the caller passed position ids (numbered from each first real token)
    layouts_after: dict[int, Layout] = field(default_factory=dict)  # the layout after each in-LLM stage
    input_embeds: torch.Tensor | None = None  # (B, L, D) entering the first decoder layer (in-LLM methods)


def run_prefill(installation: Installation, call: PrefillCall, kwargs):
    adapter = installation.adapter
    t_start = time.perf_counter()
    stats = call.stats
    input_ids = kwargs.pop("input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    user_positions = kwargs.pop("position_ids", None)
    call.caller_positions = user_positions is not None
    image_inputs = {k: kwargs.pop(k) for k in image_input_keys() if k in kwargs}
    adapter.check_prefill_inputs(input_ids, image_inputs, user_positions)
    spans = adapter.image_spans(input_ids, image_inputs)
    real = attention_mask.detach().to("cpu", torch.bool)  # sync: the inputs' padding, read once per call
    padded = not bool(real.all())  # a CPU tensor: no sync
    instructions = [Instruction(ids, adapter.embed_tokens)
                    for ids in text_after_each_image(input_ids, real, spans, padded)]
    images = adapter.encode_images(image_inputs, installation.method, instructions, stats.timer)
    full_ids, full_mask, span_units, rewritten = rewrite_spans(input_ids, attention_mask, spans, images)
    position_shift = None
    if rewritten:
        user_positions, position_shift = rewritten_positions(
            attention_mask, full_mask, input_ids.shape[1], full_ids.shape[1], user_positions is not None)
    positions = adapter.full_positions(
        full_ids, full_mask, {**image_inputs, "mm_token_type_ids": None} if rewritten else image_inputs,
        as_rows_or_none(user_positions))
    if rewritten:
        real = full_mask.detach().to("cpu", torch.bool)  # sync: the rewritten sequence's padding
        padded = not bool(real.all())
    ids, mask, pos, samples, newline_counts = compact(call, full_ids, full_mask, real, padded, positions, span_units,
                                                      images)
    if installation.contiguous:
        pos = contiguous_positions(mask, call.caller_positions).unsqueeze(0)
    for im, newlines in zip(images, newline_counts):
        stats.images.append(ImageStats(candidates=im.candidates, after_pre_llm=len(im.keep) - im.n_extra - newlines,
                                       registers=im.n_extra, newlines=newlines, info=dict(im.info)))
    kwargs.update(input_ids=ids, attention_mask=mask, position_ids=adapter.format_positions(pos),
                  mm_encoder_outputs=adapter.mm_encoder_outputs(images))
    # the layout is built only when something needs it: the in-LLM stage now, the stats when read
    entering = functools.cache(lambda: build_layout(samples))
    if Stage.LLM in installation.method.stages:
        out = installation.llm_stage.run_with_llm_pruning(call, installation.original_forward, kwargs, entering())
    else:
        out = installation.original_forward(**kwargs)
    stats.defer(ColumnRecord(call.source_columns, entering, call.layout, dict(call.layouts_after), span_units,
                             [im.unit_cells for im in images]))
    cache = output_cache(out)
    if cache is not None:
        final_mask = call.layout.mask.to(mask) if call.layout is not None else mask  # pre-LLM: the compact mask
        if installation.contiguous:
            position_shift = contiguous_shift(final_mask, attention_mask, call.caller_positions)
        installation.sessions[cache] = Session(compact_mask=final_mask, original_prompt_len=attention_mask.shape[1],
                                         original_seen=input_ids.shape[1], position_shift=position_shift)
    stats.total_seconds = time.perf_counter() - t_start
    installation.stats_log.append(stats)
    return out


def text_after_each_image(input_ids, real, spans, padded: bool = True) -> list[torch.Tensor]:
    """Per image, the token ids of the text after it (up to the next image); ``real``: the CPU mask
    of the non-padding columns (``padded`` False: all of them)."""
    out = []
    for b, sample_spans in enumerate(spans):
        for k, (start, end) in enumerate(sample_spans):
            stop = sample_spans[k + 1][0] if k + 1 < len(sample_spans) else input_ids.shape[1]
            if padded:
                out.append(input_ids[b, real_columns(real[b], end, stop).to(input_ids.device)])
            else:
                out.append(input_ids[b, end:stop])
    return out


def rewrite_spans(input_ids, attention_mask, spans, images: list[EncodedImage]):
    """Full-length sequences in which each image occupies its ``n_units`` (layouts may differ from
    the processor's placeholder count, e.g. LLaVA-NeXT 'flat'). Returns ids, mask, per-sample
    (start, n_units) of each image in the new sequence, and whether anything changed."""
    counts = iter([im.n_units for im in images])
    span_units = [[(start, next(counts)) for start, _ in sample_spans] for sample_spans in spans]
    if all(n == end - start for sample_spans, units in zip(spans, span_units)
           for (start, end), (_, n) in zip(sample_spans, units)):
        return input_ids, attention_mask, span_units, False
    rows_ids, rows_mask, span_units, k = [], [], [], 0
    for b, sample_spans in enumerate(spans):
        ids, msk, units, cursor = [], [], [], 0
        for start, end in sample_spans:
            im = images[k]
            k += 1
            ids.append(input_ids[b, cursor:start])
            msk.append(attention_mask[b, cursor:start])
            units.append((sum(len(x) for x in ids), im.n_units))
            ids.append(input_ids[b, start].expand(im.n_units))  # the span's own placeholder (image or video)
            msk.append(torch.ones(im.n_units, dtype=attention_mask.dtype, device=attention_mask.device))
            cursor = end
        ids.append(input_ids[b, cursor:])
        msk.append(attention_mask[b, cursor:])
        rows_ids.append(torch.cat(ids))
        rows_mask.append(torch.cat(msk))
        span_units.append(units)
    # re-pad on the left so that the sequences line up again
    trimmed = [(r[first_real(m):], m[first_real(m):]) for r, m in zip(rows_ids, rows_mask)]
    shift = [len(r) - len(t[0]) for r, t in zip(rows_ids, trimmed)]
    span_units = [[(s - sh, n) for s, n in u] for u, sh in zip(span_units, shift)]
    ids = left_pad([t[0] for t in trimmed], 0)
    mask = left_pad([t[1] for t in trimmed], 0)
    pad = [ids.shape[1] - len(t[0]) for t in trimmed]
    span_units = [[(s + p, n) for s, n in u] for u, p in zip(span_units, pad)]
    return ids, mask, span_units, True


def compact(call: PrefillCall, ids, mask, real, padded: bool, positions, span_units, images):
    """Drop pruned image units and insert registers; left-pad the result. The bookkeeping runs on
    small CPU index tensors, vectorised (no per-token Python); ``real``: the CPU mask of ``mask``
    (``padded`` False: no column is padding). Returns the compact ids, mask and positions, what
    ``build_layout`` needs per sample, and each image's kept newline tokens."""
    rows_cols, samples, newline_counts, k = [], [], [], 0
    for b, units in enumerate(span_units):
        cols, placed, cursor, length, last_visual = [], [], 0, 0, -1
        for start, n_units in units:
            im = images[k]
            k += 1
            text = real_columns(real[b] if padded else None, cursor, start, padded)
            keep = im.keep.cpu()  # sync: the units the method kept (one per image)
            kinds = unit_kinds(im, keep)
            newline_counts.append(int((kinds == NEWLINE).sum()) if newline_units(im) else 0)  # CPU: no sync
            cols += [text, start + keep.clamp(max=n_units - 1)]  # extras sit at the last unit's position
            placed.append((length + len(text), kinds))
            length += len(text) + len(keep)
            last_visual = length - 1 if len(keep) else last_visual
            cursor = start + n_units
        cols.append(real_columns(real[b] if padded else None, cursor, ids.shape[1], padded))
        rows_cols.append(torch.cat(cols))
        samples.append(SampleUnits(length=len(rows_cols[-1]), images=placed, last_visual=last_visual))
    lengths = [len(c) for c in rows_cols]
    width = max(lengths)
    call.source_columns = [(width - n, c) for n, c in zip(lengths, rows_cols)]
    device_cols = [c.to(ids.device) for c in rows_cols]
    out_ids = left_pad([ids[b, c] for b, c in enumerate(device_cols)], 0)
    if min(lengths) == width:
        out_mask = torch.ones(len(lengths), width, dtype=mask.dtype, device=mask.device)
    else:
        out_mask = left_pad([torch.ones(n, dtype=mask.dtype, device=mask.device) for n in lengths], 0)
    out_pos = left_pad([positions[:, b if positions.shape[1] > 1 else 0, c].T for b, c in enumerate(device_cols)],
                       0).permute(2, 0, 1)
    return out_ids, out_mask, out_pos, samples, newline_counts
