"""Adapter for ``LlavaForConditionalGeneration`` (LLaVA-1.5 and any CLIP-tower LLaVA checkpoint)."""
from __future__ import annotations

import contextlib
from typing import Mapping

import torch

from ..errors import InputError, UnsupportedModelError
from ..methods.base import ImageContext, Method, Stage
from ..registers import _first_param, _Tower, redirect_activations
from .base import Adapter, EncodedImage, block_index, grid_cells, register_adapter
from .families import Family, FlopsInfo, TinySpec, register_family


def extra_cls(method: Method | None) -> int:
    """1 when ``method`` forwards each crop's [CLS] token to the LLM, else 0."""
    return 1 if method is not None and method.forwards_cls else 0


def _state_index(block: int) -> int:
    """Index into ``hidden_states`` of the output of encoder block ``block`` (negative = from the end)."""
    return block + 1 if block >= 0 else block


@register_adapter
class LlavaAdapter(Adapter):
    family = "llava"

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

    @property
    def grid_side(self) -> int:
        vc = self.config.vision_config
        return vc.image_size // vc.patch_size

    @property
    def feature_layer(self) -> int:
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedModelError(
                "vtprune supports a single vision_feature_layer; this config concatenates several "
                f"({layer})."
            )
        return layer

    @property
    def drops_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "default"

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    # -- inputs ---------------------------------------------------------------------------------
    def num_images(self, inputs: dict) -> int:
        return inputs["pixel_values"].shape[0]

    def expected_tokens(self, inputs: dict) -> list[int]:
        n = self.grid_side ** 2 + (0 if self.drops_cls else 1)
        return [n] * self.num_images(inputs)

    # -- vision side ----------------------------------------------------------------------------
    def run_tower(self, pixel_values: torch.Tensor, method: Method | None):
        """Run the CLIP tower once; returns its hidden states and the attention recorders."""
        num_layers = len(self.vision_blocks)
        wanted = {block_index(num_layers, self.feature_layer)}
        if method is not None and any(s in method.stages for s in (Stage.VISION, Stage.PROJECTED)):
            wanted |= {l % num_layers for l in getattr(method, "attention_layers", ())}
        else:
            wanted = set()
        patch = method.vision_tower_patch(self) if method is not None else None
        with self.recording({i: self.vision_blocks[i].self_attn for i in wanted}) as recs, \
                (patch if patch is not None else contextlib.nullcontext()):
            out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        return out.hidden_states, recs

    def crop_context(self, hidden_states, recs, rows: list[int], family_image: int, extra: int,
                     grids, keep_cols: list[torch.Tensor] | None = None) -> ImageContext:
        """An ImageContext over crops ``rows`` of the tower's batch (one crop for LLaVA-1.5).

        ``keep_cols`` optionally restricts each crop to some patch indices (LLaVA-NeXT unpadding)."""
        first = 1 if self.drops_cls else 0
        n = self.grid_side ** 2
        feature = hidden_states[self.feature_layer]
        if keep_cols:
            cols = keep_cols
            feats = torch.cat([feature[r, first + c] for r, c in zip(rows, cols)])
        else:  # every patch of every crop: one slice
            cols = [torch.arange(n, device=feature.device)] * len(rows)
            feats = feature[rows, first:first + n].reshape(-1, feature.shape[-1])
        slices, start = [], 0
        for c in cols:
            slices.append(slice(start, start + len(c)))
            start += len(c)
        num_layers = len(self.vision_blocks)
        fb = block_index(num_layers, self.feature_layer)
        reg_cols = torch.arange(1 + n, 1 + n + extra, device=feature.device)

        def cls_attention():
            parts = [recs[fb].calls[0].rows(r, [0])[:, 0, 1 + c] for r, c in zip(rows, cols)]
            parts += [recs[fb].calls[0].rows(r, [0])[:, 0, reg_cols] for r in rows] if extra else []
            return torch.cat(parts, dim=-1)

        def received_attention():
            parts = []
            for r, c in zip(rows, cols):
                probs = recs[fb].calls[0].rows(r).mean(0)  # (Q, K) head mean
                parts.append(probs.mean(0)[1 + c])
            return torch.cat(parts)

        def keys():
            return torch.cat([recs[fb].calls[0].key[r][:, first + c] for r, c in zip(rows, cols)], dim=1)

        def register_received_attention():
            return torch.cat([recs[fb].calls[0].rows(r).mean(0).mean(0)[reg_cols] for r in rows])

        providers = {
            "received_attention": received_attention,
            "keys": keys,
            "register_received_attention": register_received_attention,
            "hidden": lambda layer: torch.cat([hidden_states[_state_index(layer)][r, first + c] for r, c in zip(rows, cols)]),
            "vision_attention": lambda layer: torch.stack([recs[layer % num_layers].calls[0].rows(r) for r in rows]),
        }
        if self.drops_cls:
            providers["cls_attention"] = cls_attention
        ctx = ImageContext(features=feats, grids=grids, crop_slices=slices, family=self.family,
                           image_index=family_image, extra=extra, providers=providers)
        ctx.register_features = (feature[rows, 1 + n:1 + n + extra].reshape(-1, feature.shape[-1])
                                 if extra else feature.new_zeros(0, feature.shape[-1]))
        ctx.cls_features = feature[rows, 0]  # (crops, D): forwarded by methods with ``forwards_cls``
        return ctx

    def select_and_project(self, ctx: ImageContext, method, timer, instruction) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Vision-stage selection, projection, projected-stage selection. Returns kept candidate
        indices, their LLM embeddings (registers appended) and the selection info."""
        info: dict = {}
        keep = torch.arange(ctx.num_tokens, device=ctx.features.device)
        feats = ctx.features
        sel = self.run_selection(method, Stage.VISION, ctx, timer)
        if sel is not None:
            keep, info = sel.keep, dict(sel.info)
            feats = sel.values if sel.values is not None else ctx.features[keep]
        embeds = self.project(feats)
        if method is not None and Stage.PROJECTED in method.stages:
            pctx = ImageContext(features=embeds, grids=ctx.grids, crop_slices=ctx.crop_slices, family=self.family,
                                image_index=ctx.image_index, extra=ctx.extra,
                                providers={"text_embeddings": lambda: instruction.embeddings,
                                           "instruction_ids": lambda: instruction.ids,
                                           "vision_features": lambda: ctx.features, **ctx._lazy._providers})
            if sel is not None:
                raise UnsupportedModelError("A method may prune at the vision or the projected stage, not both.")
            psel = self.run_selection(method, Stage.PROJECTED, pctx, timer)
            keep, info = psel.keep, dict(psel.info)
            embeds = psel.values if psel.values is not None else embeds[keep]
        if ctx.extra:
            embeds = torch.cat([embeds, self.project(ctx.register_features)])
        if extra_cls(method):
            embeds = torch.cat([embeds, self.project(ctx.cls_features)])
        return keep, embeds, info

    def encode_images(self, inputs, method, instructions, timer):
        pixel_values = inputs["pixel_values"]
        self.check_inputs(pixel_values)
        hidden_states, recs = self.run_tower(pixel_values, method)
        extra = method.extra_tokens if method is not None else 0
        extra_units = extra + extra_cls(method)  # per crop: registers, then the forwarded [CLS]
        side, images = self.grid_side, []
        for i in range(pixel_values.shape[0]):
            ctx = self.crop_context(hidden_states, recs, [i], i, extra, [(side, side)])
            keep, embeds, info = self.select_and_project(ctx, method, timer, instructions[i])
            n = ctx.num_tokens
            extras = torch.arange(n, n + extra_units)
            keep_units = torch.cat([keep, extras.to(keep.device)]) if extra_units else keep
            images.append(EncodedImage(embeds=embeds, keep=keep_units, n_units=n, n_extra=extra_units, candidates=n,
                                       protected=extras, info=info, unit_cells=grid_cells(side, side, extra_units)))
        return images


# -- test-time registers: the CLIP tower ----------------------------------------------------------
class ClipTower(_Tower):
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
        p = _first_param(self.core)
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
