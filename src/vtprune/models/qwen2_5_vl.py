"""Adapter for ``Qwen2_5_VLForConditionalGeneration``.

Units are the merged 2×2 tokens the LLM sees. Vision-stage features are the mean of each group's four
patch features at the tower's last block (before the merger), in raster order; received attention is
read at that block and pooled the same way. Positions are the model's own 3-D M-RoPE ids computed on
the full sequence; kept tokens keep theirs and decoding continues with the model's ``rope_deltas``.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from ..methods.base import ImageContext, Stage
from .base import Adapter, EncodedImage, register_adapter


@register_adapter
class Qwen25VLAdapter(Adapter):
    family = "qwen2_5_vl"
    cls_token = False
    position_rows = 3

    @property
    def visual(self):
        return self.model.model.visual

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
        handles = [blk.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)) for i, blk in enumerate(blocks)] if wants else []
        try:
            with self.recording(watch) as recs:
                out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        return out, recs, outputs

    def encode_images(self, inputs, method, text_embeds, timer):
        pixel_values = inputs["pixel_values"]
        self.check_inputs(pixel_values)
        grid = self.grids(inputs)
        out, recs, block_outputs = self.run_tower(pixel_values, grid, method)
        counts = self.expected_tokens(inputs)
        merged = torch.split(out.pooler_output, counts)
        order = self.unit_order(grid)  # raster unit j sits at tower position order[j]
        images, first = [], 0
        for i, n in enumerate(counts):
            images.append(self._encode_one(i, n, order[first:first + n], first, merged[i], out, recs,
                                           block_outputs, grid[i], method, timer, text_embeds[i]))
            first += n
        return images

    def _unit_features(self, patch_states: torch.Tensor, tower_idx: torch.Tensor) -> torch.Tensor:
        """Mean of each unit's patch features; ``tower_idx`` gives each raster unit's tower-order index."""
        m2 = self.merge ** 2
        groups = patch_states.view(-1, m2, patch_states.shape[-1])
        return groups[tower_idx].mean(1)

    def _received(self, recs, image: int, n: int, tower_idx_local: torch.Tensor) -> torch.Tensor:
        call = recs[len(self.visual.blocks) - 1].calls[image]
        probs = call.rows(0).mean(0).mean(0)  # (Np,) in tower order of this image
        return probs.view(-1, self.merge ** 2).mean(1)[tower_idx_local]

    def _encode_one(self, i, n, tower_idx, first, merged, out, recs, block_outputs, grid_row, method, timer,
                    text_embeds):
        tower_idx_local = tower_idx - first  # images are contiguous in the tower's order
        rows, cols = int(grid_row[1]) // self.merge, int(grid_row[2]) // self.merge
        providers = {
            "received_attention": lambda: self._received(recs, i, n, tower_idx_local),
            "hidden": lambda layer: self._unit_features(block_outputs[layer % len(self.visual.blocks)], tower_idx),
        }
        ctx = ImageContext(features=self._unit_features(out.last_hidden_state, tower_idx) if block_outputs else merged,
                           grids=[(rows, cols)], crop_slices=[slice(0, n)], family=self.family, image_index=i,
                           providers=providers)
        keep = torch.arange(n)
        embeds, info = merged, {}
        sel = self.run_selection(method, Stage.VISION, ctx, timer)
        if sel is None:
            pctx = ImageContext(features=merged, grids=ctx.grids, crop_slices=ctx.crop_slices, family=self.family,
                                image_index=i, providers={"text_embeddings": lambda: text_embeds, **providers})
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
        cells = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n) // cols, torch.arange(n) % cols], 1)
        return EncodedImage(embeds=embeds, keep=keep, n_units=n, candidates=n, info=info, unit_cells=cells,
                            deepstack=self._deepstack(out, i, keep))

    def _deepstack(self, out, image: int, keep: torch.Tensor):
        return None
