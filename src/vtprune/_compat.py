"""What differs between the transformers versions vtprune supports (>= 5.18, < 6)."""
from __future__ import annotations

from typing import Any

#: transformers 5.24 renamed ``past_key_values`` to ``cache`` (forward arguments and outputs alike)
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(kwargs: dict) -> Any:
    """The KV cache handed to a forward call, under either name (None if there is none)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(out) -> Any:
    """The KV cache a forward call returned, under either name (None if there is none). Only the
    field the output declares is read: the old name is a deprecated alias that warns when read."""
    fields = getattr(out, "__dataclass_fields__", {})
    for name in CACHE_NAMES:
        if name in fields:
            return getattr(out, name)
    return None


#: 5.18 added ``mm_encoder_outputs`` to the VLMs' forward, through which the pipeline hands over the
#: (pruned) image features
MIN_TRANSFORMERS = (5, 18)


def check_transformers() -> None:
    import transformers

    from .errors import UnsupportedModelError

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TRANSFORMERS:
        raise UnsupportedModelError(
            f"vtprune needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (found {transformers.__version__}): "
            f"older versions cannot take precomputed image features. Run `pip install -U 'transformers>=5.18,<6'`.")
