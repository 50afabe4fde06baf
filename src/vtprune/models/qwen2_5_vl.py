"""Adapter for ``Qwen2_5_VLForConditionalGeneration``.

Units are the merged 2×2 tokens the LLM sees. Vision-stage features are the mean of each group's four
patch features at the tower's last block (before the merger), in raster order; received attention is
read at that block and pooled the same way. Positions are the model's own 3-D M-RoPE ids computed on
the full sequence; kept tokens keep theirs and decoding continues with the model's ``rope_deltas``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import torch

from ..errors import InputError, UnsupportedModelError
from ..methods.base import ImageContext, Stage
from ..occamtoken.towers import RegisterTower, _Handles, _insert_after_segments, first_param, redirect_activations
from .base import Adapter, EncodedImage, unit_kind_table
from .families import Family, FlopsInfo, TinySpec, register_family
from .stages import select_and_project


class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    contiguous_positions_unsupported = (
        "its M-RoPE positions are 3-D (time, row, column) and no official code renumbers them; the text after an "
        "image already starts right after the image's largest position")

    def __init__(self, model, layout: str = "model"):
        super().__init__(model, layout)
        # read once: transformers' config attribute access is slow, and the pipeline asks on every call
        self._visual = model.model.visual
        self._merge = self.config.vision_config.spatial_merge_size
        self._image_token_id = self.config.image_token_id
        self._tables: dict[Any, Any] = {}  # per-grid constant tables, keyed on the grid values (and device)

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def visual(self):
        return self._visual

    @property
    def vision_module(self):
        return self._visual

    @property
    def vision_depth(self) -> int:
        return len(self._visual.blocks)

    @property
    def merge(self) -> int:
        return self._merge

    def grids(self, inputs) -> torch.Tensor:
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise InputError("Qwen-VL models need image_grid_thw; pass the processor's output unchanged.")
        return grid

    def grid_key(self, grid: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
        """The (t, h, w) of every image as Python ints; the key of every per-grid table."""
        return self.host_rows(grid)

    def _cached(self, key, make: Callable[[], Any]):
        value = self._tables.get(key)
        if value is None:
            if len(self._tables) >= 1024:  # a server seeing ever new image sizes: start over
                self._tables.clear()
            value = self._tables[key] = make()
        return value

    def num_images(self, inputs: dict) -> int:
        return self.grids(inputs).shape[0]

    def expected_tokens(self, inputs: dict) -> list[int]:
        m2 = self._merge ** 2
        return [t * h * w // m2 for t, h, w in self.grid_key(self.grids(inputs))]

    def check_prefill_inputs(self, input_ids, image_inputs, user_positions):
        if user_positions is not None:
            return
        mm = image_inputs.get("mm_token_type_ids")
        if mm is None or mm.shape != input_ids.shape:
            raise InputError(
                f"{type(self.model).__name__} inputs with images need mm_token_type_ids of the shape of input_ids: "
                f"without them transformers places the image tokens at 1-D text positions instead of M-RoPE. "
                f"Pass the processor's output unchanged (it includes mm_token_type_ids), or pass position_ids.")

    # -- positions --------------------------------------------------------------------------------
    def full_positions(self, input_ids, attention_mask, inputs, user_positions):
        if user_positions is not None:
            return user_positions if user_positions.dim() == 3 else user_positions.unsqueeze(0).expand(3, -1, -1)
        mm = inputs.get("mm_token_type_ids")
        if mm is None or mm.shape != input_ids.shape:
            mm = (input_ids == self._image_token_id).int()
        grid = self.grids(inputs)
        if any(inputs.get(k) is not None for k in ("pixel_values_videos", "video_grid_thw")) or grid.shape[0] == 0 \
                or any(t != 1 for t, _, _ in self.grid_key(grid)):
            positions, deltas = self.model.model.get_rope_index(  # videos, frames: the model's own (per-token) code
                input_ids, mm_token_type_ids=mm, image_grid_thw=grid, attention_mask=attention_mask)
        else:
            table = self._cached(("rope", self.grid_key(grid), input_ids.device),
                                 lambda: rope_table(self.grid_key(grid), self._merge, input_ids.device))
            positions, deltas = image_rope_index(input_ids, mm, attention_mask, table)
        self.model.model.rope_deltas = deltas
        return positions

    def decode_positions(self, session, attention_mask, q_len):
        deltas = self.model.model.rope_deltas
        if attention_mask is not None:
            pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, -q_len:]
        else:
            start = session.original_seen
            pos = torch.arange(start, start + q_len, device=session.compact_mask.device)
            pos = pos.view(1, -1).expand(session.compact_mask.shape[0], -1)
        if deltas is not None:
            pos = pos + deltas.to(pos.device)
        return pos.unsqueeze(0).expand(3, -1, -1)

    def format_positions(self, positions):
        return positions

    # -- vision side --------------------------------------------------------------------------------
    def unit_order(self, grid: torch.Tensor) -> torch.Tensor:
        """Permutation taking the tower's output order of all images' units to raster order (one per
        distinct grid)."""
        return self._cached(("order", self.grid_key(grid)), lambda: self._compute_unit_order(grid))

    def _compute_unit_order(self, grid: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, spatial_merge_size=self._merge,
                                                  window_size=self._visual.window_size,
                                                  patch_size=self._visual.patch_size, kwargs={})
        return torch.argsort(window_index)

    def run_tower(self, pixel_values, grid, method):
        blocks = self._visual.blocks
        wants = method is not None and any(s in method.stages for s in (Stage.VISION, Stage.PROJECTED))
        watch = {len(blocks) - 1: blocks[-1].attn} if wants else {}
        outputs: dict[int, torch.Tensor] = {}
        handles = []
        try:  # every hook goes inside: a method that raises while patching the tower leaves none behind
            if wants:
                for i, blk in enumerate(blocks):
                    handles.append(blk.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
            patch = method.vision_tower_patch(self) if method is not None else None
            recording = self.recording(watch) if watch else contextlib.nullcontext({})
            with recording as recs, (patch if patch is not None else contextlib.nullcontext()):
                out = self._visual(pixel_values.type(self._visual.dtype), grid_thw=grid, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        return out, recs, outputs

    def encode_images(self, inputs, method, instructions, timer):
        pixel_values = inputs["pixel_values"]
        self.check_inputs(pixel_values)
        grid = self.grids(inputs)
        out, recs, block_outputs = self.run_tower(pixel_values, grid, method)
        extra = method.extra_tokens if method is not None else 0  # registers: merged units per image
        key = self.grid_key(grid)
        counts = self.expected_tokens(inputs)
        self._split = [n + extra for n in counts]
        merged = torch.split(out.pooler_output, self._split)
        order = self.unit_order(grid)  # raster unit j sits at tower position order[j] (no registers)
        images, first = [], 0
        for i, n in enumerate(counts):
            shift = i * extra  # the registers of earlier images precede this image in the tower
            tower_idx = order[first:first + n] + shift if shift else order[first:first + n]
            register_idx = self._cached(("registers", first + shift + n, extra),
                                        lambda: torch.arange(first + shift + n, first + shift + n + extra))
            images.append(self._encode_one(i, n, extra, tower_idx, register_idx, first + shift, merged[i], out,
                                           recs, block_outputs, key[i], method, timer, instructions[i]))
            first += n
        return images

    def _unit_attention(self, recs, image: int) -> torch.Tensor:
        """Mean attention each of the image's units (tower order, registers included) receives from all of
        the image's tokens at the last block, pooled over its 2×2 patches."""
        call = recs[len(self._visual.blocks) - 1].calls[image]
        return call.rows(0).mean(0).mean(0).view(-1, self._merge ** 2).mean(1)

    def _encode_one(self, i, n, extra, tower_idx, register_idx, start, merged, out, recs, block_outputs, grid_row,
                    method, timer, instruction):
        rows, cols = grid_row[1] // self._merge, grid_row[2] // self._merge
        merge2 = self._merge ** 2
        features = unit_features(out.last_hidden_state, tower_idx, merge2) if block_outputs else merged[:n]
        ctx = unit_context(features, (rows, cols), family=self.family, image_index=i, extra=extra, tower_idx=tower_idx,
                           start=start, merge2=merge2, num_blocks=len(self._visual.blocks),
                           block_output=block_outputs.__getitem__, unit_attention=lambda: self._unit_attention(recs, i),
                           register_idx=register_idx)
        keep, embeds, info = select_and_project(ctx, method, None, timer=timer, instruction=instruction,
                                                projected=merged[:n])
        registers, cells, kinds = self._cached(("cells", n, cols, extra), lambda: unit_cells(n, cols, extra))
        kept = keep.cpu()  # sync: the units the method kept (one per image)
        keep_units = torch.cat([kept, registers]) if extra else kept.long()
        return EncodedImage(embeds=torch.cat([embeds, merged[n:]]) if extra else embeds, keep=keep_units, n_units=n,
                            n_extra=extra, candidates=n, protected=registers, info=info, unit_cells=cells,
                            unit_kind=kinds,
                            deepstack=self._deepstack(out, i, keep_units))

    def _deepstack(self, out, image: int, keep: torch.Tensor):
        return None


def unit_cells(n: int, cols: int, extra: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The register indices (n .. n+extra), the (crop, row, col) cells of an image's ``n`` raster
    units (``cols`` per row) followed by its ``extra`` registers (cells -1), and every unit's kind.
    Constant per shape: the callers keep them, nothing writes to them."""
    units = torch.arange(n)
    cells = torch.stack([torch.zeros(n, dtype=torch.long), units // cols, units % cols], 1)
    return (torch.arange(n, n + extra), torch.cat([cells, torch.full((extra, 3), -1)]),
            unit_kind_table(torch.zeros(n, dtype=torch.bool), extra))


# -- M-RoPE positions of image + text sequences ---------------------------------------------------
def rope_table(key: tuple[tuple[int, int, int], ...], merge: int, device) -> torch.Tensor:
    """(4, 1 + units) long table on ``device`` over all images' units of ``key`` ((t, h, w) in patches,
    in order), after a column 0 for text: rows 0-2, each unit's (frame, row, column) minus how far
    its position lies behind a text token's at its place (``j + advance + 1``; text: 1); row 3, at
    each image's first unit, how far the position counter advances past the image beyond its token
    count (transformers: max(h, w) // merge per image, for t·h·w / merge² tokens)."""
    columns = [torch.tensor([[-1], [-1], [-1], [0]])]
    for t, h, w in key:
        rows, cols = h // merge, w // merge
        n = t * rows * cols
        advance = max(h, w) // merge - n
        j = torch.arange(n)
        behind = j + advance + 1
        first = torch.zeros(n, dtype=torch.long)
        first[0] = advance
        columns.append(torch.stack([j // (rows * cols) - behind, j // cols % rows - behind, j % cols - behind, first]))
    return torch.cat(columns, 1).to(device)


def image_rope_index(input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Qwen2.5-VL / Qwen3-VL ``get_rope_index`` for single-frame images (t == 1) only,
    without a per-token loop or a host read: (3, B, L) positions (0 at padding) and (B, 1) deltas;
    ``table``: :func:`rope_table`.

    As there, padding (``attention_mask`` 0) is dropped first; text advances one position per token;
    an image (a run of ``mm_token_type_ids == 1``, the grids taken in batch order) at counter ``s``
    gets ``s + (frame, row, column)`` per unit, and the counter moves on by max(h, w) / merge. Here the
    image tokens are cut by the grids' unit counts (as the pipeline does), so back-to-back images,
    where transformers raises, get each its own positions; image tokens beyond the grids' units (where
    transformers raises too) take the last unit's."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    image = (mm_token_type_ids == 1) & valid
    seen = valid.cumsum(-1)  # real tokens so far, this one included
    unit = image.view(-1).cumsum(0).view_as(image).mul_(image).clamp_(max=table.shape[1] - 1)  # 1 + unit; text: 0
    per_token = table[:, unit]
    advanced = per_token[3].cumsum(-1)  # the advances of the row's images so far
    positions = (seen + advanced + per_token[:3]).mul_(valid).to(input_ids.dtype)
    # the largest position is the counter at the end, less one (single-frame images: no frame index
    # exceeds the image's advance), so max + 1 - real tokens = the row's total advance
    return positions, advanced[:, -1:]


# -- merged units, shared with the vLLM variants ---------------------------------------------------
def unit_features(patch_states: torch.Tensor, tower_idx: torch.Tensor, merge2: int) -> torch.Tensor:
    """Mean of each unit's ``merge2`` patch states; ``tower_idx`` gives each unit's index in the tower's
    (unit) order."""
    return patch_states.view(-1, merge2, patch_states.shape[-1])[tower_idx].mean(1)


def unit_context(features: torch.Tensor, grid: tuple[int, int], *, family: str, image_index: int, extra: int,
                 tower_idx: torch.Tensor, start: int, merge2: int, num_blocks: int,
                 block_output: Callable[[int], torch.Tensor], unit_attention: Callable[[], torch.Tensor],
                 register_idx: torch.Tensor | None = None) -> ImageContext:
    """The vision-stage ImageContext of one image's merged units (raster order).

    ``tower_idx``: each unit's index in the tower's unit order; ``start``: the image's first unit there;
    ``block_output(block)``: (patches, D) the tower's packed states after ``block``; ``unit_attention()``:
    (units,) the attention each of the image's units (tower order, from ``start``) receives at the last
    block; ``register_idx``: the tower-order indices of the image's registers (HF path)."""
    providers = {
        "received_attention": lambda: unit_attention()[tower_idx - start],
        "hidden": lambda layer: unit_features(block_output(layer % num_blocks), tower_idx, merge2),
    }
    if register_idx is not None:
        providers["register_received_attention"] = lambda: unit_attention()[register_idx - start]
    return ImageContext(features=features, grids=[grid], crop_slices=[slice(0, len(tower_idx))], family=family,
                        image_index=image_index, extra=extra, providers=providers)


# -- test-time registers: the Qwen vision towers (Qwen2.5-VL, Qwen3-VL) ---------------------------
class QwenTower(RegisterTower):
    """Qwen2.5-VL / Qwen3-VL vision towers: packed (S, D) hidden states of all images, no CLS.

    Calibration splits the packed sequence per image by ``grid_thw`` (Qwen2.5-VL's window permutation
    stays inside each image, so per-image token sets are right).

    The register **[decision]**: 4 zero tokens per image (one 2×2 merge group, so the merger and
    Qwen3-VL's DeepStack mergers emit exactly one extra merged token per image, at the end of the
    image's tokens) inserted after each image's patches in the packed sequence, right after the patch
    embedding: no learned position embedding (Qwen3-VL: zero interpolation weights), rotary position
    (0, 0) (= no rotation), each image's attention segment (``cu_seqlens``) grown by 4. Qwen2.5-VL's
    windowed blocks: the register group is its own window (after the image's windows), so it joins
    the image's tokens in the full-attention blocks only. Images only (``grid_t == 1``).
    """

    kind = "qwen"
    has_cls = False
    register_copies = 4

    @classmethod
    def matches(cls, module) -> bool:
        return hasattr(module, "blocks") and hasattr(module, "merger") and hasattr(module, "patch_embed")

    def processor_batch(self, out):
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def __init__(self, core):
        super().__init__(core)
        self._sizes: list[int] | None = None  # patches per image of the call in flight (register active)

    @property
    def layers(self):
        return self.core.blocks

    def prepare(self, batch):
        if not isinstance(batch, Mapping) or "image_grid_thw" not in batch and "grid_thw" not in batch:
            raise InputError("Qwen vision towers take dict batches with 'pixel_values' and 'image_grid_thw' "
                             "(the output of the model's image processor).")
        p = first_param(self.core)
        thw = batch.get("image_grid_thw", batch.get("grid_thw"))
        return {"pixel_values": batch["pixel_values"].to(device=p.device, dtype=p.dtype),
                "grid_thw": torch.as_tensor(thw).to(p.device)}

    def num_images(self, batch):
        return batch["grid_thw"].shape[0]

    def run(self, batch):
        return self.core(batch["pixel_values"], grid_thw=batch["grid_thw"])

    def split(self, t, batch):
        sizes = [int(s) for s in batch["grid_thw"].prod(-1).tolist()]
        if self._sizes is not None:  # register active: each image carries its 4 copies at its end
            sizes = [n + self.register_copies for n in sizes]
        return list(t.split(sizes, dim=0))

    def identity_tensors(self):
        ts = [first_param(self.core.patch_embed), self.site(0).weight, self.site(self.num_layers - 1).weight]
        ts += [self.site(i).bias for i in range(self.num_layers) if self.site(i).bias is not None]
        return ts

    # -- intervention ---------------------------------------------------------------------------
    _PRECOMPUTED = ("cu_seqlens", "max_seqlen", "position_ids", "window_index", "cu_window_seqlens",
                    "max_window_seqlen", "interp_indices", "interp_weights")

    def _register_kwargs(self, grid: torch.Tensor, sizes: list[int]) -> dict[str, Any]:
        from transformers import vision_utils as vu

        core, c, k = self.core, self.core.config, self.register_copies
        merge = c.spatial_merge_size
        out: dict[str, Any] = {}
        pos = vu.get_vision_position_ids(grid, merge)
        out["position_ids"] = _insert_after_segments(pos, sizes, k, 0, dim=0 if pos.shape[0] == sum(sizes) else -1)
        seqlens = torch.tensor([n + k for n in sizes], device=grid.device)
        out["cu_seqlens"] = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0), value=0)
        if hasattr(core, "pos_embed"):  # Qwen3-VL: learned, interpolated position embedding
            idx, w = vu.get_vision_interpolation_indices_and_weights(
                grid, num_grid_per_side=core.num_grid_per_side, mode=core.interpolation_mode,
                align_corners=core.interpolation_align_corners, spatial_merge_size=merge)
            out["interp_indices"] = _insert_after_segments(idx, sizes, k, 0)
            out["interp_weights"] = _insert_after_segments(w, sizes, k, 0.0)
        if hasattr(core, "window_size") and hasattr(core, "fullatt_block_indexes"):  # Qwen2.5-VL windows
            window_index, cu_window = vu.get_vision_window_index(
                grid, spatial_merge_size=merge, window_size=core.window_size, patch_size=core.patch_size)
            unit = merge * merge
            groups = [n // unit for n in sizes]
            new_index, old_off, new_off = [], 0, 0
            for g_i, part in zip(groups, window_index.split(groups)):
                new_index += [part - old_off + new_off,
                              torch.tensor([new_off + g_i], dtype=part.dtype, device=part.device)]
                old_off, new_off = old_off + g_i, new_off + g_i + 1
            bounds, new_bounds, row_off = cu_window.tolist(), [0], 0
            for i, n in enumerate(sizes):
                new_bounds += [b + k * i for b in bounds if row_off < b <= row_off + n]
                new_bounds.append(row_off + n + k * (i + 1))
                row_off += n
            out["window_index"] = torch.cat(new_index)
            out["cu_window_seqlens"] = torch.tensor(new_bounds, dtype=cu_window.dtype, device=cu_window.device)
        return out

    def append_register_hook(self):
        def before(module, args, kwargs):
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if grid is None:
                raise InputError("The Qwen vision tower was called without grid_thw.")
            if bool((grid[:, 0] != 1).any()):
                raise UnsupportedModelError("Test-time registers support images (grid_t == 1), not videos.")
            self._sizes = [int(n) for n in grid.prod(-1).tolist()]
            for key in self._PRECOMPUTED:
                kwargs.pop(key, None)
            kwargs.update(self._register_kwargs(grid, self._sizes))
            return args, kwargs

        def after(module, args, output):
            return _insert_after_segments(output, self._sizes, self.register_copies, 0)

        return _Handles([self.core.register_forward_pre_hook(before, with_kwargs=True),
                         self.core.patch_embed.register_forward_hook(after)])

    def redirect(self, h, channels, mode):
        # packed rows: image i = [its N_i patches, its 4 register copies], images one after another
        out = h.clone()
        k, start = self.register_copies, 0
        for n in self._sizes:
            seg = out[start:start + n + k]
            out[start:start + n + k] = redirect_activations(seg[None], channels, patch=slice(0, n),
                                                            register=slice(n, n + k), mode=mode)[0]
            start += n + k
        return out


# -- tiny test model ------------------------------------------------------------------------------
def _tiny_config():
    from transformers import Qwen2_5_VLConfig

    from ..tiny import IMAGE_TOKEN, VIDEO_TOKEN, VOCAB

    return Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=56,
                           fullatt_block_indexes=[1], in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=5, vision_end_token_id=6)


def _qwen_pixels(config, size, seed):
    vc = config.vision_config
    patch, merge, tps = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    h, w = size[0] // patch, size[1] // patch
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(h * w, vc.in_channels * tps * patch * patch, generator=g)
    return pixels, torch.tensor([1, h, w]), (h // merge) * (w // merge)


def tiny_inputs(model, samples):
    """Qwen-VL processor-shaped inputs (packed patches, ``image_grid_thw``) for ``vtprune.tiny``."""
    cfg = model.config
    rows, pixels, grids = [], [], []
    for s in samples:
        p, thw, n = _qwen_pixels(cfg, s.size, s.image_seed)
        pixels.append(p)
        grids.append(thw)
        rows.append(s.before + [cfg.vision_start_token_id] + [cfg.image_token_id] * n
                    + [cfg.vision_end_token_id] + s.after)
    return rows, torch.cat(pixels), {"image_grid_thw": torch.stack(grids)}


QWEN_INPUT_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
#: OccamToken on Qwen: λ1 = 0.5 (ours, unvalidated), stage-II layer 10 [paper]
QWEN_OCCAMTOKEN_DEFAULTS = {"lambda1": 0.5, "layer": 10}

FAMILY = register_family(Family(
    name="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    hf_classes=("Qwen2_5_VLForConditionalGeneration",),
    adapter=Qwen25VLAdapter,
    model_types=("qwen2_5_vl",),
    input_keys=QWEN_INPUT_KEYS,
    has_cls=False,
    vision_merge=False,  # the 2×2 merger needs the four original patch features
    vision_attention=False,  # only the last block's attention is recorded
    fixed_grid=True,
    mrope=True,
    merge_factor=2,
    tower_group="qwen2_5_vl",
    register_tower=QwenTower,
    vision_classes={"qwen2_5_vl_vision": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
                                          "Qwen2_5_VisionTransformerPretrainedModel")},
    flops=FlopsInfo(tower="merger", mlp_mats=3, windowed=True),  # SwiGLU gate/up/down; window attention
    defaults={"occamtoken": QWEN_OCCAMTOKEN_DEFAULTS},
    tiny=TinySpec(config=_tiny_config, inputs=tiny_inputs, image_size=(112, 112)),
    vllm=("VTPruneQwen2_5_VLForConditionalGeneration", "vtprune.serving.vllm_qwen2_5_vl"),
))
