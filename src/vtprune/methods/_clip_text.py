"""The CLIP pieces CDPruner's official relevance needs, loaded once from a local CLIP checkpoint.

The official LLaVA code (Theia-4869/CDPruner, ``clip_encoder.py``) compares

* image embeddings: the feature layer's patch tokens (the ones LLaVA projects) passed through the vision
  tower's ``post_layernorm`` and the checkpoint's ``visual_projection``;
* text embeddings: the instruction tokenised by the checkpoint's CLIP tokenizer, right-padded with id 0
  (attention mask 0) to a multiple of the text tower's 77 positions, cut into 77-token segments, and
  encoded by ``CLIPTextModelWithProjection``: one ``text_embeds`` row per segment.

Everything runs in fp32. ``post_layernorm`` is taken from the CLIP checkpoint; the official code takes it
from the LLaVA model's own vision tower. The two agree where LLaVA kept the CLIP weights (LLaVA reads an
inner layer, so ``post_layernorm`` receives no gradient in its training).
"""
from __future__ import annotations

import torch


class ClipTextRelevance:
    """CLIP image/text embeddings of one image's candidates and instruction (see the module docstring).

    ``clip_path``: a local CLIP checkpoint directory (e.g. openai/clip-vit-large-patch14-336 saved with
    ``save_pretrained``); ``llm_tokenizer``: a local tokenizer directory of the LLM, used to turn the
    instruction's token ids back into text."""

    def __init__(self, clip_path: str, llm_tokenizer: str):
        from transformers import (AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizerFast,
                                  CLIPVisionModelWithProjection)

        self.tokenizer = CLIPTokenizerFast.from_pretrained(clip_path)
        self.text_tower = CLIPTextModelWithProjection.from_pretrained(clip_path, torch_dtype=torch.float32).eval()
        self.text_tower.requires_grad_(False)
        vision = CLIPVisionModelWithProjection.from_pretrained(clip_path, torch_dtype=torch.float32)
        self.post_layernorm = vision.vision_model.post_layernorm.requires_grad_(False)
        self.visual_projection = vision.visual_projection.requires_grad_(False)
        del vision  # only its last norm and projection are needed
        self.segment = self.text_tower.config.max_position_embeddings
        self.llm_tokenizer = AutoTokenizer.from_pretrained(llm_tokenizer)

    def _to(self, device: torch.device) -> None:
        self.text_tower.to(device)
        self.post_layernorm.to(device)
        self.visual_projection.to(device)

    def _segments(self, row: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(1, L) → (M, 77): right-padded with zeros to whole segments."""
        return torch.cat([row, row.new_zeros(1, -row.shape[1] % self.segment)], dim=1).reshape(-1, self.segment).to(device)

    def instruction_text(self, ids: torch.Tensor) -> str:
        """The instruction's text from the LLM's token ids (special tokens dropped)."""
        return self.llm_tokenizer.decode(ids.cpu(), skip_special_tokens=True).strip()  # sync: text for the CLIP tokenizer, once per image

    @torch.no_grad()
    def image_embeds(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(N, C) CLIP image embeddings of the feature layer's candidate tokens (N, D_vision)."""
        self._to(vision_features.device)
        return self.visual_projection(self.post_layernorm(vision_features.float()))

    @torch.no_grad()
    def text_embeds(self, text: str, device: torch.device) -> torch.Tensor:
        """(M, C) one CLIP text embedding per 77-token segment of ``text``."""
        self._to(device)
        tokens = self.tokenizer(text=text, return_tensors="pt")
        return self.text_tower(input_ids=self._segments(tokens["input_ids"], device),
                               attention_mask=self._segments(tokens["attention_mask"], device)).text_embeds.float()

    def embeddings(self, vision_features: torch.Tensor, instruction_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text embeddings that the official relevance compares."""
        return (self.image_embeds(vision_features),
                self.text_embeds(self.instruction_text(instruction_ids), vision_features.device))
