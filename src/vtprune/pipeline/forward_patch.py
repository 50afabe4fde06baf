"""Wraps a model's ``forward`` and puts back exactly what was there."""
from __future__ import annotations

import functools
import inspect

_NOTHING = object()  # marks "no forward on the instance" (a forward of None is a value)


class ForwardPatch:
    """Sets ``model.forward`` to a wrapper that calls ``handler``; ``restore()`` puts back the forward set
    on the instance (accelerate's dispatch hooks), or removes ours when there was none."""

    def __init__(self, model, handler):
        self.model = model
        self.instance_forward = model.__dict__.get("forward", _NOTHING)
        self.original = model.forward
        original = self.original

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return handler(*args, **kwargs)

        # generate() pre-encodes images when forward accepts `mm_encoder_outputs`; hiding that
        # parameter makes it hand us pixel_values at the prefill, where we run the vision side.
        signature = inspect.signature(original)
        forward.__signature__ = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "mm_encoder_outputs"])
        model.forward = forward

    def restore(self) -> None:
        if self.instance_forward is _NOTHING:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self.instance_forward
