"""Tiny models of each supported family, built from configs with random weights, and inputs for them.

They run the real transformers code paths in a fraction of a second on a CPU; the tests and the
no-download examples use them. They answer nonsense: use them for mechanics, never for accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_TOKEN = 3
VIDEO_TOKEN = 4
VOCAB = 64


def _families() -> tuple[str, ...]:
    from .models.families import all_families

    return tuple(f.name for f in all_families() if f.tiny is not None)


#: every family with a tiny model (from the registry, ``vtprune.models.families``)
FAMILIES = _families()


def _spec(family: str):
    from .models.families import get

    fam = get(family)
    if fam.tiny is None:
        raise ValueError(f"Family {family!r} declares no tiny model; choose one of {FAMILIES}.")
    return fam


def tiny_config(family: str):
    """A small config of ``family`` (see FAMILIES)."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; choose one of {FAMILIES}.")
    return _spec(family).tiny.config()


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised tiny model of ``family`` in eval mode, fp32."""
    import transformers

    cls = getattr(transformers, _spec(family).hf_classes[0])
    torch.manual_seed(seed)
    model = cls._from_config(tiny_config(family), attn_implementation=attn_implementation)
    return model.eval()


@dataclass
class Sample:
    """One prompt: text ids before and after the image, and the image itself."""

    before: list[int]
    after: list[int]
    image_seed: int
    size: tuple[int, int] = (56, 56)  # image height, width in pixels (LLaVA-NeXT / Qwen)


def make_inputs(model, samples: list[Sample], pad_token_id: int = 0) -> dict:
    """Left-padded model inputs for ``samples`` (one image each) in the format the HF processor emits."""
    from vtprune.models.families import family_of_model

    family = family_of_model(model)
    rows, pixel_values, extra = family.tiny.inputs(model, samples)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r):] = torch.tensor(r)
        attention_mask[i, length - len(r):] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, **extra}
    if "mm_token_type_ids" in family.input_keys:
        out["mm_token_type_ids"] = (input_ids == model.config.image_token_id).int()
    return out
