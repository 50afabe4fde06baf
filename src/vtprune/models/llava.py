"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and any CLIP-tower LLaVA checkpoint)."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Mapping

import torch

from ..attention import AttentionRecorder
from ..errors import InputError, UnsupportedModelError
from ..methods.base import ImageContext, Method
from ..occamtoken.towers import RegisterTower, first_param, redirect_activations
from .base import Adapter, EncodedImage, unit_kind_table
from .families import Family, FlopsInfo, TinySpec, register_family
from .stages import (ClipTowerShape, append_extras, clip_context, feature_index, forwarded_cls, select_and_project,
                     watched_blocks)


class LlavaAdapter(Adapter):
    family = "llava"

    def __init__(self, model, layout: str = "model"):
        super().__init__(model, layout)
        self.unit_cells = functools.lru_cache(maxsize=8)(self.unit_cells)  # per adapter: no model kept alive

    # -- vision tower structure ---------------------------------------------------------------
    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    @property
    def vision_module(self):
        return self.vision_tower

    @property
    def vision_depth(self) -> int:
        return len(self.vision_blocks)

    @property
    def vision_blocks(self):
        tower = self.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    # the tower's structure is read from the config once per apply(): a transformers config attribute
    # costs microseconds, and the prefill path reads these many times per call
    @functools.cached_property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    @functools.cached_property
    def feature_layer(self) -> int:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedModelError(
                "vtprune supports a single vision_feature_layer; this config concatenates several "
                f"({layer})."
            )
        return layer

    @functools.cached_property
    def drops_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "default"

    @property
    def patch_offset(self) -> int:
        """Index of the first patch in the tower's sequence (1: after CLIP's [CLS])."""
        return 1

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    # -- inputs ---------------------------------------------------------------------------------
    def num_images(self, inputs: dict) -> int:
        return inputs["pixel_values"].shape[0]

    def expected_tokens(self, inputs: dict) -> list[int]:
        n = self.grid_side ** 2 + (0 if self.drops_cls else 1)
        return [n] * self.num_images(inputs)

    # -- vision side ----------------------------------------------------------------------------
    @functools.cached_property
    def tower_shape(self) -> ClipTowerShape:
        layers = len(self.vision_blocks)
        return ClipTowerShape(num_layers=layers, feature_index=feature_index(self.feature_layer, layers),
                              patches=self.grid_side ** 2, patch_offset=self.patch_offset, drops_cls=self.drops_cls)

    def run_tower(self, pixel_values: torch.Tensor, method: Method | None) -> RecordedTower:
        """Run the CLIP tower once, recording the attention of the blocks ``method`` reads."""
        wanted = watched_blocks(method, self.tower_shape)
        patch = method.vision_tower_patch(self) if method is not None else None
        with self.recording({i: self.vision_blocks[i].self_attn for i in wanted}) as recs, \
                (patch if patch is not None else contextlib.nullcontext()):
            out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        return RecordedTower(out.hidden_states, recs)

    def crop_context(self, tower: RecordedTower, rows: list[int], image_index: int, extra: int, grids,
                     keep_cols: list[torch.Tensor] | None = None) -> ImageContext:
        """An ImageContext over crops ``rows`` of the tower's batch (one crop for LLaVA-1.5).

        ``keep_cols`` optionally restricts each crop to some patch indices (LLaVA-NeXT unpadding)."""
        return clip_context(tower, self.tower_shape, rows, keep_cols, family=self.family, image_index=image_index,
                            extra=extra, grids=grids)

    def encode_images(self, inputs, method, instructions, timer):
        pixel_values = inputs["pixel_values"]
        self.check_inputs(pixel_values)
        tower = self.run_tower(pixel_values, method)
        extra = method.extra_tokens if method is not None else 0
        extra_units = extra + forwarded_cls(method)  # per crop: registers, then the forwarded [CLS]
        side, images = self.grid_side, []
        for i in range(pixel_values.shape[0]):
            ctx = self.crop_context(tower, [i], i, extra, [(side, side)])
            keep, embeds, info = select_and_project(ctx, method, self.project, timer=timer, instruction=instructions[i])
            embeds = append_extras(embeds, ctx, method, self.project)
            n = ctx.num_tokens
            cells, extras, kinds = self.unit_cells(n, side, extra_units)
            images.append(EncodedImage(embeds=embeds, keep=torch.cat([keep, extras.to(keep.device)]), n_units=n,
                                       n_extra=extra_units, candidates=n, protected=extras, info=info,
                                       unit_cells=cells, unit_kind=kinds))
        return images

    def unit_cells(self, n: int, side: int, extra_units: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (crop, row, col) of each unit of one ``side``×``side`` crop followed by ``extra_units``
        registers / [CLS] (-1), the extras' unit indices and every unit's kind; made once per shape
        (read-only)."""
        patch = torch.arange(n)
        cells = torch.stack([torch.zeros(n, dtype=torch.long), patch // side, patch % side], 1)
        return (torch.cat([cells, torch.full((extra_units, 3), -1)]), torch.arange(n, n + extra_units),
                unit_kind_table(torch.zeros(n, dtype=torch.bool), extra_units))


@dataclass
class RecordedTower:
    """One run of a transformers CLIP-style tower, read as a :class:`~vtprune.models.stages.TowerReadout`:
    its ``hidden_states`` and the attention recorders of the watched blocks."""

    hidden_states: tuple[torch.Tensor, ...]
    recorders: dict[int, AttentionRecorder]

    def hidden_state(self, index: int) -> torch.Tensor:
        return self.hidden_states[index]

    def attention_rows(self, block: int, crop: int, rows=None) -> torch.Tensor:
        return self.recorders[block].calls[0].rows(crop, rows)

    def keys(self, block: int, crop: int) -> torch.Tensor:
        return self.recorders[block].calls[0].key[crop]


# -- test-time registers: the CLIP tower ----------------------------------------------------------
class ClipTower(RegisterTower):
    """``CLIPVisionModel`` (transformers 5): embeddings → pre_layrnorm → encoder.layers → post_layernorm.
    Batched (B, S, D) hidden states, CLS at position 0; with the register: (B, 1 + N + 1, D)."""

    kind = "clip"
    has_cls = True
    batched = True

    @classmethod
    def matches(cls, module) -> bool:
        return all(hasattr(module, a) for a in ("embeddings", "pre_layrnorm", "encoder"))

    def processor_batch(self, out):
        pv = out["pixel_values"]
        if pv.dim() == 5:  # LLaVA-NeXT AnyRes: (B, crops, 3, H, W); calibrate on the base view
            pv = pv[:, 0]
        return pv

    @property
    def layers(self):
        return self.core.encoder.layers

    def prepare(self, batch):
        if isinstance(batch, Mapping):
            batch = batch["pixel_values"]
        if not isinstance(batch, torch.Tensor):
            raise InputError(f"Expected a pixel tensor (B, 3, H, W) or a dict with 'pixel_values', got "
                             f"{type(batch).__name__}.")
        if batch.dim() == 3:
            batch = batch.unsqueeze(0)
        if batch.dim() == 5:  # LLaVA-NeXT processor output (B, crops, 3, H, W): every crop is an image
            batch = batch.flatten(0, 1)
        if batch.dim() != 4:
            raise InputError(f"Expected pixel values (B, 3, H, W), got shape {tuple(batch.shape)}.")
        p = first_param(self.core)
        return {"pixel_values": batch.to(device=p.device, dtype=p.dtype)}

    def num_images(self, batch):
        return batch["pixel_values"].shape[0]

    def run(self, batch):
        return self.core(pixel_values=batch["pixel_values"])

    def split(self, t, batch):
        return list(t.unbind(0))

    def identity_tensors(self):
        emb = self.core.embeddings
        ts = [emb.patch_embedding.weight, emb.class_embedding, emb.position_embedding.weight,
              self.layers[0].mlp.fc1.weight, self.layers[-1].mlp.fc2.weight]
        ts += [blk.mlp.fc1.bias for blk in self.layers if blk.mlp.fc1.bias is not None]
        return ts

    # -- intervention ---------------------------------------------------------------------------
    def append_register_hook(self):
        def append(module, args):
            x = args[0]
            reg = x.new_zeros(x.shape[0], 1, x.shape[-1])  # zero token, no position embedding
            return (torch.cat([x, reg], dim=1), *args[1:])

        # appended before the pre-norm, exactly like the reference (cat zeros, then ln_pre)
        return self.core.pre_layrnorm.register_forward_pre_hook(append)

    def redirect(self, h, channels, mode):
        # positions: 0 = CLS (untouched), 1..S-2 = patches, S-1 = register
        return redirect_activations(h, channels, patch=slice(1, -1), register=slice(-1, None), mode=mode)

    def cls_attention(self, layer, hidden):
        blk = self.layers[layer]
        attn = blk.self_attn
        x = blk.layer_norm1(hidden)
        b, s, _ = x.shape
        heads, hd = attn.num_heads, attn.head_dim
        q = attn.q_proj(x[:, :1]).float().view(b, 1, heads, hd)
        k = attn.k_proj(x).float().view(b, s, heads, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (hd ** -0.5)
        return torch.softmax(scores, dim=-1)[:, :, 0]  # (B, H, S)


# -- tiny test model ------------------------------------------------------------------------------
def llama_text(**extra):
    from transformers import LlamaConfig

    from ..tiny import VOCAB

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def clip_vision(image_size: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=image_size, patch_size=14, projection_dim=32)


def _tiny_config():
    from transformers import LlavaConfig

    from ..tiny import IMAGE_TOKEN

    return LlavaConfig(vision_config=clip_vision(56), text_config=llama_text(), image_token_id=IMAGE_TOKEN,
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def _tiny_inputs(model, samples):
    cfg = model.config
    side = cfg.vision_config.image_size
    rows, pixels = [], []
    for s in samples:
        g = torch.Generator().manual_seed(s.image_seed)
        pixels.append(torch.randn(3, side, side, generator=g))
        rows.append(s.before + [cfg.image_token_id] * (side // cfg.vision_config.patch_size) ** 2 + s.after)
    return rows, torch.stack(pixels), {}


#: OccamToken's paper settings on LLaVA: λ1 = 0.015 (LLaVA-1.5), stage-II layer 11
OCCAMTOKEN_DEFAULTS = {"lambda1": 0.015, "layer": 11}
CLIP_VISION_CLASSES = {"clip_vision_model": ("transformers", "CLIPVisionModel")}

FAMILY = register_family(Family(
    name="llava",
    display_name="LLaVA-1.5",
    hf_classes=("LlavaForConditionalGeneration",),
    adapter=LlavaAdapter,
    model_types=("llava",),
    input_keys=("pixel_values",),
    has_cls=True,
    vision_merge=True,
    vision_attention=True,
    fixed_grid=True,
    merge_factor=1,
    tower_group="clip",
    register_tower=ClipTower,
    vision_classes=CLIP_VISION_CLASSES,
    flops=FlopsInfo(tower="clip", mlp_mats=2, default_crops=1),
    defaults={"occamtoken": OCCAMTOKEN_DEFAULTS},
    tiny=TinySpec(config=_tiny_config, inputs=_tiny_inputs, image_size=(56, 56)),
    vllm=("VTPruneLlavaForConditionalGeneration", "vtprune.serving.vllm_llava"),
))
