"""Adapter for ``Qwen2_5_VLForConditionalGeneration``.

Units are the merged 2×2 tokens the LLM sees. Vision-stage features are the mean of each group's four
patch features at the tower's last block (before the merger), in raster order; received attention is
read at that block and pooled the same way. Positions are the model's own 3-D M-RoPE ids computed on
the full sequence; kept tokens keep theirs and decoding continues with the model's ``rope_deltas``.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import InputError
from ..methods.base import ImageContext, Stage
from .base import Adapter, EncodedImage, register_adapter


@register_adapter
class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    contiguous_positions_unsupported = (
        "its M-RoPE positions are 3-D (time, row, column) and no official code renumbers them; the text after an "
        "image already starts right after the image's largest position")

    @property
    def visual(self):
        return self.model.model.visual

    @property
    def vision_module(self):
        return self.visual

    @property
    def vision_depth(self) -> int:
        return len(self.visual.blocks)

    @property
    def merge(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def grids(self, inputs) -> torch.Tensor:
        grid = inputs.get("image_grid_thw")
        if grid is None:
            raise InputError("Qwen-VL models need image_grid_thw; pass the processor's output unchanged.")
        return grid

    def num_images(self, inputs: dict) -> int:
        return self.grids(inputs).shape[0]

    def expected_tokens(self, inputs: dict) -> list[int]:
        return (self.grids(inputs).prod(-1) // self.merge ** 2).tolist()

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
            mm = (input_ids == self.image_token_id).int()
        positions, deltas = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm, image_grid_thw=self.grids(inputs), attention_mask=attention_mask)
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
        """Permutation taking the tower's output order of all images' units to raster order."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

        window_index, _ = get_vision_window_index(grid, spatial_merge_size=self.merge,
                                                  window_size=self.visual.window_size,
                                                  patch_size=self.visual.patch_size, kwargs={})
        return torch.argsort(window_index)

    def run_tower(self, pixel_values, grid, method):
        blocks = self.visual.blocks
        wants = method is not None and any(s in method.stages for s in (Stage.VISION, Stage.PROJECTED))
        watch = {len(blocks) - 1: blocks[-1].attn} if wants else {}
        outputs: dict[int, torch.Tensor] = {}
        handles = []
        try:  # every hook goes inside: a method that raises while patching the tower leaves none behind
            if wants:
                for i, blk in enumerate(blocks):
                    handles.append(blk.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
            patch = method.vision_tower_patch(self) if method is not None else None
            with self.recording(watch) as recs, (patch if patch is not None else contextlib.nullcontext()):
                out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid, return_dict=True)
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
        counts = self.expected_tokens(inputs)
        self._split = [n + extra for n in counts]
        merged = torch.split(out.pooler_output, self._split)
        order = self.unit_order(grid)  # raster unit j sits at tower position order[j] (no registers)
        images, first = [], 0
        for i, n in enumerate(counts):
            shift = i * extra  # the registers of earlier images precede this image in the tower
            tower_idx = order[first:first + n] + shift
            register_idx = torch.arange(first + shift + n, first + shift + n + extra)
            images.append(self._encode_one(i, n, extra, tower_idx, register_idx, first + shift, merged[i], out,
                                           recs, block_outputs, grid[i], method, timer, instructions[i]))
            first += n
        return images

    def _unit_features(self, patch_states: torch.Tensor, tower_idx: torch.Tensor) -> torch.Tensor:
        """Mean of each unit's patch features; ``tower_idx`` gives each unit's tower-order index."""
        groups = patch_states.view(-1, self.merge ** 2, patch_states.shape[-1])
        return groups[tower_idx].mean(1)

    def _received(self, recs, image: int, local_idx: torch.Tensor) -> torch.Tensor:
        """Mean attention each unit (``local_idx``: tower order within the image) receives from all
        of the image's tokens at the last block, pooled over its 2×2 patches."""
        call = recs[len(self.visual.blocks) - 1].calls[image]
        probs = call.rows(0).mean(0).mean(0)  # (patches,) in the tower's order for this image
        return probs.view(-1, self.merge ** 2).mean(1)[local_idx]

    def _encode_one(self, i, n, extra, tower_idx, register_idx, start, merged, out, recs, block_outputs, grid_row,
                    method, timer, instruction):
        rows, cols = int(grid_row[1]) // self.merge, int(grid_row[2]) // self.merge
        providers = {
            "received_attention": lambda: self._received(recs, i, tower_idx - start),
            "register_received_attention": lambda: self._received(recs, i, register_idx - start),
            "hidden": lambda layer: self._unit_features(block_outputs[layer % len(self.visual.blocks)], tower_idx),
        }
        ctx = ImageContext(features=self._unit_features(out.last_hidden_state, tower_idx) if block_outputs else merged[:n],
                           grids=[(rows, cols)], crop_slices=[slice(0, n)], family=self.family, image_index=i,
                           extra=extra, providers=providers)
        keep, embeds, info = torch.arange(n), merged[:n], {}
        sel = self.run_selection(method, Stage.VISION, ctx, timer)
        if sel is None:
            pctx = ImageContext(features=merged[:n], grids=ctx.grids, crop_slices=ctx.crop_slices, family=self.family,
                                image_index=i, extra=extra, providers={"text_embeddings": lambda: instruction.embeddings,
                                                           "instruction_ids": lambda: instruction.ids, **providers})
            sel = self.run_selection(method, Stage.PROJECTED, pctx, timer)
            if sel is not None and sel.values is not None:
                embeds = sel.values
        elif sel.values is not None:
            raise InputError(f"Method '{method.name}' merges vision features; on {self.family} merge after the "
                             f"projector (Stage.PROJECTED) instead.")
        if sel is not None:
            keep, info = sel.keep, dict(sel.info)
            if sel.values is None:
                embeds = merged[keep]
        registers = torch.arange(n, n + extra)
        keep_units = torch.cat([keep.cpu(), registers])
        cells = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n) // cols, torch.arange(n) % cols], 1)
        cells = torch.cat([cells, torch.full((extra, 3), -1)])
        return EncodedImage(embeds=torch.cat([embeds, merged[n:]]), keep=keep_units, n_units=n, n_extra=extra,
                            candidates=n, protected=registers, info=info, unit_cells=cells,
                            deepstack=self._deepstack(out, i, keep_units))

    def _deepstack(self, out, image: int, keep: torch.Tensor):
        return None
