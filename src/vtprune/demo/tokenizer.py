"""The demo model's word-level tokenizer and LLaVA processor, built from the scene templates."""
from __future__ import annotations

from . import scenes

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
TEMPLATE_WORDS = ["USER", "ASSISTANT", ":", "?", "what", "color", "is", "the", "shape", "object", "how", "many",
                  "objects", "are", "there", "a", "left", "right", "of", "above", "below", "describe", "image", "."]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% else %}ASSISTANT: {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def vocabulary() -> list[str]:
    words = list(SPECIAL) + TEMPLATE_WORDS
    words += list(scenes.COLOR_NAMES) + list(scenes.SHAPES) + list(scenes.PLURALS.values()) + list(scenes.NUMBERS)
    words += ["yes", "no", "or"]  # "or" last: added with the left-or-right spatial questions (ids stay put)
    out, seen = [], set()
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", padding_side="left", extra_special_tokens={"image_token": "<image>"})
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": scenes.IMAGE_SIZE}, do_center_crop=True,
                                         crop_size={"height": scenes.IMAGE_SIZE, "width": scenes.IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=scenes.PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"
