"""``keep_all``: keeps every token, at a chosen insertion point. It exists to prove the pipeline is
exact (a keep-all run must reproduce the unmodified model) and as the 'no pruning' row of tables."""
from __future__ import annotations

import torch

from typing import Literal

from ..errors import ArgumentError
from .base import Method, Selection, Stage, register_method


@register_method
class KeepAll(Method):
    name = "keep_all"

    def __init__(self, stage: Literal["vision", "projected", "llm"] | Stage = Stage.VISION, layer: int = 2):
        super().__init__()
        if layer < 1:
            raise ArgumentError(f"keep_all: layer={layer!r} is not allowed; in-LLM stages start at layer 1 or later.")
        self.stage = Stage(stage)
        self.stages = (self.stage,)
        self.llm_layers = (layer,) if self.stage == Stage.LLM else ()

    def _all(self, n: int, device) -> Selection:
        return Selection(keep=torch.arange(n, device=device))

    def select_vision(self, ctx):
        return self._all(ctx.num_tokens, ctx.features.device)

    select_projected = select_vision

    def select_llm(self, ctx):
        return self._all(len(ctx.visual), ctx.hidden.device)

    def describe(self) -> str:
        return f"keep_all({self.stage.value})"
