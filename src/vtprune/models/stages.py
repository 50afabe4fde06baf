"""Stage code shared by the Hugging Face adapters and the vLLM variants (``vtprune.serving``).

Both paths call these functions, so a fix lands once:

- :func:`run_selection` calls a method at the vision or projected stage and checks what it returned
  (indices in range, an empty keep only where registers or [CLS] tokens still reach the LLM, no merged
  vision-stage features on a family whose projector cannot take them);
- :func:`select_and_project` runs vision stage → projector → projected stage for one image;
- :func:`append_extras` appends the LLM inputs of the test-time registers and forwarded [CLS] tokens;
- :func:`clip_context` builds the :class:`~vtprune.methods.base.ImageContext` of an image's crops on a
  CLIP-style tower (a ViT, with or without [CLS]) from a :class:`TowerReadout`: transformers' tower
  outputs and attention recorders on the HF path, vLLM's tower run in ``vtprune.serving``.

Family-specific stage code shared by both paths lives in the family's module (the LLaVA-NeXT unit table,
the Qwen merged-unit context).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..errors import InputError, UnsupportedMethodError
from ..methods.base import ImageContext, Instruction, Method, Selection, Stage


class TowerReadout(Protocol):
    """What :func:`clip_context` reads from one run of a CLIP-style tower over a batch of crops."""

    def hidden_state(self, index: int) -> torch.Tensor:
        """(crops, S, D) hidden states: index 0 = embeddings, i = output of block i - 1."""

    def attention_rows(self, block: int, crop: int, rows=None) -> torch.Tensor:
        """(H, R, S) fp32 attention probabilities of query ``rows`` (all if None) of one crop."""

    def keys(self, block: int, crop: int) -> torch.Tensor:
        """(H, S, d) the block's key states of one crop."""


@dataclass(frozen=True)
class ClipTowerShape:
    """Where things sit in a CLIP-style tower's sequence of one crop."""

    num_layers: int  # blocks of the full tower (``attention_layers`` are taken modulo it)
    feature_index: int  # the feature layer among [embeddings, block 0, block 1, ...] (>= 1)
    patches: int  # patches per crop
    patch_offset: int = 1  # tower position of patch 0 (1: after CLIP's [CLS]; 0: SigLIP)
    drops_cls: bool = True  # the LLM sees the patches only (vision_feature_select_strategy="default")

    @property
    def feature_block(self) -> int:
        return self.feature_index - 1


def feature_index(feature_layer: int, num_layers: int) -> int:
    """Index into [embeddings, block 0, ..., block L-1] of ``hidden_states[feature_layer]``."""
    idx = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= idx <= num_layers:
        raise ValueError(f"vision_feature_layer={feature_layer} is not the output of an encoder block.")
    return idx


def forwarded_cls(method: Method | None) -> int:
    """1 when ``method`` hands the LLM each crop's [CLS] token (after the image's kept units), else 0."""
    return 1 if method is not None and method.forwards_cls else 0


def watched_blocks(method: Method | None, shape: ClipTowerShape) -> set[int]:
    """The tower blocks whose attention must be recorded for ``method``."""
    if method is None or not any(s in method.stages for s in (Stage.VISION, Stage.PROJECTED)):
        return set()
    return {shape.feature_block} | {layer % shape.num_layers for layer in getattr(method, "attention_layers", ())}


# -- the context of a CLIP-style tower ------------------------------------------------------------
def clip_context(tower: TowerReadout, shape: ClipTowerShape, crops: list[int],
                 cols: list[torch.Tensor] | None = None, *, family: str, image_index: int, extra: int,
                 grids) -> ImageContext:
    """The ImageContext of one image over tower crops ``crops`` (patch columns ``cols`` of each, all by
    default). ``extra``: test-time registers appended after each crop's patches. The context provides
    ``register_features`` and ``cls_features`` (feature-layer rows) for :func:`append_extras`.

    Everything but the candidates' features is computed when a method first asks for it; with all
    columns (``cols`` None) the candidates are slices of the tower's states, not gathers."""
    first = shape.patch_offset if shape.drops_cls else 0  # the first feature the LLM sees
    at, n, block = shape.patch_offset, shape.patches, shape.feature_block  # at: tower position of patch 0
    feature = tower.hidden_state(shape.feature_index)
    reg_cols = slice(at + n, at + n + extra)

    def columns(offset: int) -> list:  # per crop, the tower positions of its candidates
        return [slice(offset, offset + n)] * len(crops) if cols is None else [offset + c for c in cols]

    def gather(rows_of: Callable[[int], torch.Tensor], offset: int) -> torch.Tensor:  # candidates' rows, all crops
        parts = [rows_of(r)[c] for r, c in zip(crops, columns(offset))]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def cls_attention():  # the candidates of every crop, then each crop's register columns
        parts = [tower.attention_rows(block, r, [0])[:, 0, c] for r, c in zip(crops, columns(at))]
        parts += [tower.attention_rows(block, r, [0])[:, 0, reg_cols] for r in crops] if extra else []
        return torch.cat(parts, dim=-1)

    def received(crop: int) -> torch.Tensor:  # mean over heads and queries
        return tower.attention_rows(block, crop).mean(0).mean(0)

    def hidden(layer: int) -> torch.Tensor:
        states = tower.hidden_state(layer + 1 if layer >= 0 else shape.num_layers + 1 + layer)
        return gather(lambda r: states[r], first)

    providers = {
        "received_attention": lambda: gather(received, at),
        "keys": lambda: gather(lambda r: tower.keys(block, r).transpose(0, 1), first).transpose(0, 1),
        "register_received_attention": lambda: torch.cat([received(r)[reg_cols] for r in crops]),
        "hidden": hidden,
        "vision_attention": lambda layer: torch.stack([tower.attention_rows(layer % shape.num_layers, r)
                                                       for r in crops]),
        "register_features": lambda: feature[crops][:, reg_cols].reshape(-1, feature.shape[-1]),
        "cls_features": lambda: feature[crops][:, 0],  # (crops, D): forwarded by methods with ``forwards_cls``
    }
    if shape.drops_cls:
        providers["cls_attention"] = cls_attention
    sizes = [n] * len(crops) if cols is None else [len(c) for c in cols]
    return ImageContext(features=gather(lambda r: feature[r], first), grids=list(grids),
                        crop_slices=crop_slices(sizes), family=family, image_index=image_index, extra=extra,
                        providers=providers)


def crop_slices(sizes: list[int]) -> list[slice]:
    """The candidate range of each crop when crops of ``sizes`` candidates follow each other."""
    slices, start = [], 0
    for size in sizes:
        slices.append(slice(start, start + size))
        start += size
    return slices


# -- selection and projection ---------------------------------------------------------------------
def run_selection(method: Method | None, stage: Stage, ctx: ImageContext,
                  timer: Callable = contextlib.nullcontext) -> Selection | None:
    """``method``'s selection at ``stage`` (None when it does not prune there), checked."""
    if method is None or stage not in method.stages:
        return None
    with timer():
        selection = (method.select_vision if stage == Stage.VISION else method.select_projected)(ctx)
    check_selection(method, stage, ctx, selection)
    return selection


def check_selection(method: Method, stage: Stage, ctx: ImageContext, selection: Selection) -> None:
    if stage == Stage.VISION and selection.values is not None and "vision_merge" not in ctx.capabilities:
        raise InputError(f"Method '{method.name}' merges vision features; on {ctx.family} merge after the "
                         f"projector (Stage.PROJECTED) instead.")
    if selection.keep.numel() == 0:
        if ctx.extra == 0 and not method.forwards_cls:  # registers / [CLS] still reach the LLM
            raise InputError(f"Method '{method.name}' kept no token of image {ctx.image_index}; give it a "
                             f"budget that keeps at least one token.")
        return
    # before the indices reach a gather (a bad one fails deep inside torch, or as a device assert)
    low, high = torch.stack(torch.aminmax(selection.keep)).tolist()  # sync: the range of a selection, per image
    if high >= ctx.num_tokens or low < 0:
        raise InputError(f"Method '{method.name}' returned indices outside the {ctx.num_tokens} candidates; "
                         f"Selection.keep indexes the context's features.")


def select_and_project(ctx: ImageContext, method: Method | None, project: Callable | None, *,
                       timer: Callable = contextlib.nullcontext, instruction: Instruction | None = None,
                       projected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Vision-stage selection, projection, projected-stage selection of one image's candidates.

    Returns the kept candidate indices (where the method computed them; on the host when no method
    selected), their LLM inputs and the selection's info. ``projected``: the
    candidates' LLM inputs when they are not ``project(ctx.features)`` (Qwen's merger, OneVision's pooled
    video cells); ``project`` then only projects merged vision-stage features. ``instruction``: the text
    after the image, for projected-stage methods that read it (absent inside vLLM)."""
    stages = () if method is None else method.stages
    if Stage.VISION in stages and Stage.PROJECTED in stages:
        raise UnsupportedMethodError(f"Method '{method.name}' may prune at the vision or the projected stage, "
                                     f"not both.")
    sel = run_selection(method, Stage.VISION, ctx, timer)
    if sel is None:  # every candidate (on the host: nothing to read back)
        keep, info = torch.arange(ctx.num_tokens), {}
        embeds = projected if projected is not None else project(ctx.features)
    else:
        keep, info = sel.keep, dict(sel.info)
        if sel.values is not None:
            embeds = project(sel.values)
        else:
            embeds = projected[keep] if projected is not None else project(ctx.features[keep])
    if Stage.PROJECTED not in stages:
        return keep, embeds, info
    psel = run_selection(method, Stage.PROJECTED, projected_context(ctx, embeds, instruction), timer)
    return psel.keep, (psel.values if psel.values is not None else embeds[psel.keep]), dict(psel.info)


def projected_context(ctx: ImageContext, embeds: torch.Tensor, instruction: Instruction | None) -> ImageContext:
    """The projected stage's context: ``embeds`` as candidates, the vision stage's providers, the
    vision-stage features and, where given, the instruction."""
    providers = {"vision_features": lambda: ctx.features, **ctx._lazy._providers}
    if instruction is not None:
        providers = {"text_embeddings": lambda: instruction.embeddings, "instruction_ids": lambda: instruction.ids,
                     **providers}
    return ImageContext(features=embeds, grids=ctx.grids, crop_slices=ctx.crop_slices, family=ctx.family,
                        image_index=ctx.image_index, extra=ctx.extra, providers=providers)


def append_extras(embeds: torch.Tensor, ctx: ImageContext, method: Method | None, project: Callable) -> torch.Tensor:
    """``embeds`` followed by the LLM inputs of the crops' test-time registers, then of their [CLS]
    tokens where ``method`` forwards them (CLIP-style towers: ``ctx`` from :func:`clip_context`)."""
    if ctx.extra:
        embeds = torch.cat([embeds, project(ctx.register_features)])
    if forwarded_cls(method):
        embeds = torch.cat([embeds, project(ctx.cls_features)])
    return embeds
