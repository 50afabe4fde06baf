"""vLLM's Qwen2.5-VL with vtprune pruning (images; videos are not accepted by this variant).

Select it with ``hf_overrides={"architectures": ["VTPruneQwen2_5_VLForConditionalGeneration"],
"vtprune_method": "cls_topk", "vtprune_ratio": 0.25}``. Candidates are the merged 2×2 units the LLM
sees, in raster order, as in ``vtprune.models.qwen2_5_vl``: vision-stage features are the mean of each
unit's four patch states at the tower's last block, received attention is read at that block and
pooled the same way; projected-stage features are the merger's outputs. Kept units keep their (t, h, w)
M-RoPE positions.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import BaseProcessingInfo

from ..models.qwen2_5_vl import unit_context, unit_features
from ..models.stages import select_and_project
from .vllm_plugin import (SPEC_FIELD, Host, ImageSlot, PlaceholderCountMixin, PruneSpec, PrunedPositionsMixin,
                          attach_positions, check_count, check_qwen_placeholders, chosen_methods, image_record,
                          observe, strip_request_keys)

FAMILY = "qwen2_5_vl"


# ------------------------------------------------------------------------------------------------
# front end (shared with Qwen3-VL)
# ------------------------------------------------------------------------------------------------
class QwenPruneInfoMixin:
    vtprune_family = FAMILY

    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**strip_request_keys(kwargs))

    def get_image_processor(self, **kwargs: object):
        return super().get_image_processor(**strip_request_keys(kwargs))

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # the pruning variants take images only

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        supported = BaseProcessingInfo.get_supported_mm_processor_kwargs(self)  # no video scope
        supported.setdefault("images_kwargs", set()).update({"min_pixels", "max_pixels"})
        return supported

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.get_max_image_tokens()}  # unpruned: requests may turn pruning off

    def vtprune_spec(self, kwargs: Mapping[str, object] | None = None) -> PruneSpec:
        return PruneSpec.from_config(self.get_hf_config()).with_request(kwargs or {})

    def vtprune_host(self) -> Host:
        return Host.of(self.vtprune_family, self.get_hf_config())


class QwenPruneProcessorMixin(PlaceholderCountMixin):
    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        processed_data = super()._apply_hf_processor_main(mm_items, strip_request_keys(hf_kwargs))
        grid = processed_data.get("image_grid_thw")
        if grid is None:
            return processed_data
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        spec = self.info.vtprune_spec(hf_kwargs)
        pixel = processed_data.get("pixel_values") is not None
        rows = []
        for t, h, w in torch.as_tensor(grid).tolist():
            units = (int(t), int(h) // merge, int(w) // merge)
            n = units[0] * units[1] * units[2]
            if not pixel:  # image embeddings are passed through unpruned
                rows.append(PruneSpec(None).record(n, n))
            else:
                rows.append(image_record(spec, self.info.vtprune_host(), [(units[0] * units[1], units[2])]))
        processed_data[SPEC_FIELD] = torch.tensor(rows, dtype=torch.long)
        return processed_data

    def vtprune_placeholder_id(self, hf_processor_mm_kwargs: Mapping[str, object]) -> int:
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        return self.info.get_tokenizer().get_vocab()[hf_processor.image_token]

    def _maybe_apply_prompt_updates(self, mm_items, mm_res):
        prompt_ids, placeholders = super()._maybe_apply_prompt_updates(mm_items, mm_res)
        image_token_id = self.info.get_hf_config().image_token_id
        check_qwen_placeholders(prompt_ids, [p.to_range() for p in placeholders.get("image", [])], image_token_id)
        return prompt_ids, placeholders


class VTPruneQwen2_5_VLProcessingInfo(QwenPruneInfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class VTPruneQwen2_5_VLMultiModalProcessor(QwenPruneProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


# ------------------------------------------------------------------------------------------------
# model (shared position logic with Qwen3-VL)
# ------------------------------------------------------------------------------------------------
class QwenPruneModelMixin(PrunedPositionsMixin):
    vtprune_one_d = False

    def vtprune_setup(self, family: str) -> None:
        config = self.config
        self.vtprune_server = PruneSpec.from_config(config)
        self.vtprune_host = Host.of(family, config)
        self.vtprune_image_token_id = config.image_token_id
        self.vtprune_merge = config.vision_config.spatial_merge_size
        self.is_multimodal_pruning_enabled = False  # vLLM's video EVS stays off; we add our own channels

    def vtprune_image_slot(self, mm_feature) -> ImageSlot:
        t, h, w = (int(x) for x in mm_feature.data["image_grid_thw"].data.tolist())
        rows, cols = h // self.vtprune_merge, w // self.vtprune_merge
        idx = torch.arange(t * rows * cols)
        rel = torch.stack([idx // (rows * cols), (idx // cols) % rows, idx % cols])
        return ImageSlot(mm_feature.mm_position.offset, mm_feature.mm_position.length, rel, max(t, rows, cols))

    def vtprune_units(self, grid_row) -> tuple[int, int, int]:
        t, h, w = (int(x) for x in grid_row)
        return t * (h // self.vtprune_merge) * (w // self.vtprune_merge), h // self.vtprune_merge, w // self.vtprune_merge

    @staticmethod
    def vtprune_rel(keep: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return torch.stack([keep // (rows * cols), (keep // cols) % rows, keep % cols], dim=1)

    def vtprune_passthrough(self, embeds_per_image, grid) -> list[torch.Tensor]:
        out = []
        for e, g in zip(embeds_per_image, grid.tolist()):
            _, rows, cols = self.vtprune_units(g)
            keep = torch.arange(e.shape[0], device=e.device)
            out.append(attach_positions(e, self.vtprune_rel(keep, rows, cols)))
        return out

    def vtprune_embed(self, spec_field, kwargs, main_dim: int | None = None) -> list[torch.Tensor] | None:
        """``embed_multimodal`` of both Qwen variants (None when the request has no image). With
        ``main_dim`` (Qwen3-VL), the tower's output columns past it are DeepStack levels, sliced with
        the same keep mask as the main features."""
        family = self.vtprune_host.family
        mm = self._parse_and_validate_multimodal_inputs(**kwargs)
        if not mm:
            return None
        if "video" in mm:
            raise ValueError(f"vtprune's {family} variant takes images only.")
        image_input = mm["image"]
        grid = image_input["image_grid_thw"]
        if image_input["type"] == "image_embeds":
            return self.vtprune_passthrough(self._process_image_input(image_input), grid)
        counts = [self.vtprune_units(g) for g in grid.tolist()]
        chosen = chosen_methods(spec_field, len(counts), self.vtprune_server, self.vtprune_host)
        watch = any(m is not None for m, _, _ in chosen)
        if watch and self.use_data_parallel:
            raise ValueError("vtprune: pruning with mm_encoder_tp_mode='data' is not supported.")
        run = QwenTowerRun(self.visual, image_input["pixel_values"], grid.tolist(), watch)
        merge2 = self.vtprune_merge ** 2
        blocks = len(self.visual.blocks)
        out, first = [], 0
        for (n, rows, cols), (method, kept, _) in zip(counts, chosen):
            full = run.merged[first:first + n]
            merged, deepstack = (full, None) if main_dim is None else (full[:, :main_dim], full[:, main_dim:])
            tower_idx = run.reverse[first:first + n]
            features = unit_features(run.blocks[blocks - 1], tower_idx, merge2) if run.blocks else merged
            ctx = unit_context(features, (rows, cols), family=family, image_index=0, extra=0, tower_idx=tower_idx,
                               start=first, merge2=merge2, num_blocks=blocks, block_output=run.blocks.__getitem__,
                               unit_attention=lambda first=first, n=n: run.received(first, n, merge2))
            keep, embeds, _ = select_and_project(ctx, method, None, projected=merged)
            if method is not None:
                check_count(method, keep.numel(), kept)
            if deepstack is not None:
                embeds = torch.cat([embeds, deepstack[keep]], dim=1)
            out.append(attach_positions(embeds, self.vtprune_rel(keep, rows, cols)))
            first += n
        return out


class QwenTowerRun:
    """One run of vLLM's Qwen2.5-VL / Qwen3-VL tower; keeps each block's output (tower order) and the last
    block's query/key states after rotary embedding (all heads)."""

    def __init__(self, visual, pixel_values: torch.Tensor, grid: list[list[int]], watch: bool):
        self.meta = visual.prepare_encoder_metadata(grid)
        self.blocks: dict[int, torch.Tensor] = {}
        self.qk = None
        watched: dict = {}
        if watch:
            watched = {i: blk for i, blk in enumerate(visual.blocks)}
            self._last = visual.blocks[-1].attn
            watched["qk"] = self._last.apply_rotary_emb
            self.scale = float(self._last.hidden_size_per_attention_head ** -0.5)
            full = getattr(visual, "fullatt_block_indexes", None)
            if full is not None and len(visual.blocks) - 1 not in full:
                raise ValueError("vtprune: Qwen2.5-VL's last vision block must use full attention.")
        with observe(watched, self._keep):
            self.merged = visual(pixel_values, grid_thw=grid, encoder_metadata=self.meta)
        reverse = self.meta.get("reverse_indices")  # Qwen2.5-VL: window order; Qwen3-VL: raster order
        self.reverse = reverse.long() if reverse is not None else torch.arange(self.merged.shape[0],
                                                                                device=self.merged.device)

    def _keep(self, key, output) -> None:
        if key != "qk":
            self.blocks[key] = output.reshape(output.shape[0], -1)
            return
        attn = self._last
        heads = attn.num_attention_heads_per_partition
        qk = output.reshape(2, -1, heads, attn.hidden_size_per_attention_head)  # (2, S, H, d)
        q, k = qk[0].transpose(0, 1), qk[1].transpose(0, 1)  # (H, S, d)
        if attn.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_gather

            q = tensor_model_parallel_all_gather(q.contiguous(), dim=0)
            k = tensor_model_parallel_all_gather(k.contiguous(), dim=0)
        self.qk = (q.detach(), k.detach())

    def received(self, first: int, n: int, merge2: int) -> torch.Tensor:
        """(n,) mean attention each unit of the image (tower order) receives at the last block."""
        q, k = self.qk
        lo, hi = first * merge2, (first + n) * merge2
        scores = torch.einsum("hqd,hkd->hqk", q[:, lo:hi].float(), k[:, lo:hi].float()) * self.scale
        probs = torch.softmax(scores, dim=-1).mean(0).mean(0)
        return probs.view(-1, merge2).mean(1)


@MULTIMODAL_REGISTRY.register_processor(VTPruneQwen2_5_VLMultiModalProcessor, info=VTPruneQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VTPruneQwen2_5_VLForConditionalGeneration(QwenPruneModelMixin, Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune_setup(FAMILY)

    def embed_multimodal(self, **kwargs: object):
        return self.vtprune_embed(kwargs.pop(SPEC_FIELD, None), kwargs) or []
