"""Tiny checkpoints on disk in the layout vLLM loads (llava-hf / Qwen), with a small word-level
tokenizer and the model's own HF processor. Random weights: for mechanics only.

``build(family, path)`` writes config, weights, tokenizer and processor to ``path`` and returns it.
The HF models loaded back from ``path`` and vLLM's models read identical weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

WORDS = ("USER ASSISTANT : , . ? ! the a an is are what which color shape how many left right above below "
         "of in on image picture there red green blue yellow purple orange circle square triangle star cross "
         "diamond yes no one two three four five six seven eight describe answer word").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "\n"]
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER : {% else %}ASSISTANT : {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}")
QWEN_TEMPLATE = LLAVA_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")


def _tokenizer(template: str, extra: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + list(extra))}  # extra: after the words
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>",
                                   additional_special_tokens=[t for t in SPECIALS[3:] + list(extra) if t != "<unk>"])
    fast.chat_template = template
    return fast, len(vocab)


def _text_config(vocab: int, **extra) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=1024, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra)


def _clip(image_size: int) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=image_size, patch_size=14, projection_dim=32)


def _spread(model) -> None:
    """Re-initialise with unit-variance activations so that greedy tokens depend on the image and on
    which visual tokens were kept (the default 0.02 init answers one token whatever the input)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed_tokens" in name else 1.3 / fan_in ** 0.5))
            elif "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _save_state(model, path: Path, rename=None) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if rename is not None:
        state = {rename(k): v for k, v in state.items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def _llava_hf_name(k: str) -> str:
    """llava-hf layout: vision weights under vision_tower.vision_model.*"""
    pre = "model.vision_tower."
    if k.startswith(pre) and not k.startswith(pre + "vision_model."):
        return pre + "vision_model." + k[len(pre):]
    return k


def build(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family in ("llava", "llava_next"):
        return _build_llava(family, path)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        return _build_qwen(family, path)
    if family == "llava_onevision":
        return _build_onevision(path)
    raise ValueError(family)


def _build_llava(family: str, path: Path) -> Path:
    from transformers import (CLIPImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor, LlavaProcessor, CLIPVisionConfig)

    tok, vocab = _tokenizer(LLAVA_TEMPLATE)
    image_token = tok.convert_tokens_to_ids("<image>")
    text = LlamaConfig(**_text_config(vocab))
    if family == "llava":
        side = 112
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**_clip(side)), text_config=text, image_token_id=image_token,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration._from_config(cfg)
        ip = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                              vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE)
    else:
        side = 56
        pins = [[56, 112], [112, 56], [112, 112]]
        cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**_clip(side)), text_config=text,
                              image_token_id=image_token, image_grid_pinpoints=pins, vision_feature_layer=-2,
                              vision_feature_select_strategy="default")
        model = LlavaNextForConditionalGeneration._from_config(cfg)
        ip = LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                     image_grid_pinpoints=pins)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                                  vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE)
    _spread(model)
    model.eval()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    _save_state(model, path, _llava_hf_name)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _build_onevision(path: Path) -> Path:
    """AnyRes like the LLaVA-NeXT checkpoint (56 px crops, up to 2×2), a SigLIP tower read in full at its
    last block, a Qwen2 decoder."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              Qwen2Config, SiglipVisionConfig)

    tok, vocab = _tokenizer(LLAVA_TEMPLATE, extra=("<video>",))
    side, pins = 56, [[56, 112], [112, 56], [112, 112]]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=side, patch_size=14, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**_text_config(vocab)),
                               image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pins,
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg)
    ip = LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=pins)
    vp = LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, num_image_tokens=16,
                                   vision_feature_select_strategy="full", chat_template=LLAVA_TEMPLATE)
    _spread(model)
    model.eval()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    _save_state(model, path, _llava_hf_name)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _build_qwen(family: str, path: Path) -> Path:
    tok, vocab = _tokenizer(QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                        "<|vision_end|>")}
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen2_5_vl":
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                                  Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

        cfg = Qwen2_5_VLConfig(
            text_config=_text_config(vocab, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [4, 6, 6]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=56,
                               fullatt_block_indexes=[1], in_channels=3),
            **common)
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg)
        ip = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112 * 4, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
        vp = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
        proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_TEMPLATE)
    else:
        from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                                  Qwen2VLImageProcessor, Qwen3VLVideoProcessor)

        cfg = Qwen3VLConfig(
            text_config=_text_config(vocab, head_dim=32, rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                "mrope_interleaved": True}),
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                               num_position_embeddings=64, deepstack_visual_indexes=[0, 1], in_channels=3),
            **common)
        model = Qwen3VLForConditionalGeneration._from_config(cfg)
        ip = Qwen2VLImageProcessor(min_pixels=64 * 64, max_pixels=128 * 128 * 4, patch_size=16, merge_size=2,
                                   temporal_patch_size=2)
        vp = Qwen3VLVideoProcessor(size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, patch_size=16,
                                   merge_size=2, temporal_patch_size=2)
        proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, chat_template=QWEN_TEMPLATE)
    _spread(model)
    model.eval()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(path)
    _save_state(model, path)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(build(sys.argv[1], sys.argv[2]))
