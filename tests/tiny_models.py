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
