"""Tiny checkpoints of the four families with real processors, saved to a folder.

The LLaVA one stands in for the shipped scenes model when that is not installed; all four check
that the lmms-eval model handles each family's processor, batching and pruning. Random weights:
the answers are noise, but lmms-eval and vtprune's own evaluation must agree on them."""
from __future__ import annotations

from pathlib import Path

LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}USER: "
                  "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}"
                  "{{ c['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QWEN_TEMPLATE = ("{% for message in messages %}USER: {% for c in message['content'] %}{% if c['type'] == 'image' %}"
                 "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                 "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QWEN_SPECIALS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}


def build_tokenizer(qwen: bool = False):
    """A word-level tokenizer over the scenes vocabulary (ids 0-2: pad, bos, eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vtprune.demo.scenes import vocabulary

    image = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"] if qwen else ["<image>"]
    specials = ["<pad>", "<s>", "</s>", "<unk>", *image]
    words = sorted(set(vocabulary()) | {"USER", "ASSISTANT"})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    extra = QWEN_SPECIALS if qwen else {"image_token": "<image>"}
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left", extra_special_tokens=extra)


def save_tiny(family: str, path, seed: int = 0) -> Path:
    """Save a tiny ``family`` model (see ``vtprune.tiny``) and its processor to ``path``."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vtprune.tiny import tiny_config

    path = Path(path)
    qwen = family.startswith("qwen")
    tokenizer = build_tokenizer(qwen)
    config = tiny_config(family)
    config.text_config.vocab_size = len(tokenizer)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config.text_config, key, getattr(tokenizer, key))
    if qwen:
        ids = tokenizer.convert_tokens_to_ids
        config.image_token_id, config.video_token_id = ids("<|image_pad|>"), ids("<|video_pad|>")
        config.vision_start_token_id, config.vision_end_token_id = ids("<|vision_start|>"), ids("<|vision_end|>")
    else:
        config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(path)
    _processor(family, config, tokenizer).save_pretrained(path)
    return path


def _processor(family, config, tokenizer):
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        side = config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                              num_additional_image_tokens=1)
    if family == "llava_next":
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        side = config.vision_config.image_size
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                                  image_grid_pinpoints=config.image_grid_pinpoints)
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                  vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                                  num_additional_image_tokens=1)
    from transformers import Qwen2VLImageProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(), chat_template=QWEN_TEMPLATE)


def save_tiny_llava(path, seed: int = 0) -> Path:
    return save_tiny("llava", path, seed)
