"""The tiny models and image sizes the pipeline tests share (one model per family per test session)."""
from vtprune.tiny import tiny_model

_MODELS = {}


def model_of(family):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def size_of(family, k=0):
    """Image k's size: two aspect ratios where the family lays images out dynamically."""
    if family.startswith("qwen"):
        return [(112, 112), (84, 140)][k]
    if family == "llava_next":
        return [(56, 56), (28, 56)][k]
    return (56, 56)


def tiny_clip_checkpoint(path, vision_hidden=32):
    """A tiny CLIP checkpoint (random weights, a character-level tokenizer) saved into ``path``."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789?.,!'"
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8, projection_dim=12,
                                         bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=0),
                        vision_config=dict(hidden_size=vision_hidden, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=12),
                        projection_dim=12)
    CLIPModel(config).save_pretrained(path)
    return path
