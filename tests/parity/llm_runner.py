"""Shared by the LLM-stage parity runners: an ``LLMContext`` over a ``llm_sequence.sequence`` sample."""
from __future__ import annotations

import torch

from vtprune.methods.base import LLMContext

from .llm_sequence import sequence


def sample(case: dict) -> dict[str, torch.Tensor]:
    inputs, seq = case["inputs"], case.get("sequence", {})
    return sequence(inputs["kind"], inputs["seed"], n=inputs.get("n", 576), llm_dim=inputs.get("llm_dim", 256),
                    text=inputs.get("text", 24), dim=inputs.get("dim", 1024), prefix=seq.get("prefix", 35),
                    heads=seq.get("heads", 8))


def context(s: dict[str, torch.Tensor], providers: dict | None = None, layer: int = 2, stage: int = 0,
            visual: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> LLMContext:
    start, n = int(s["image_start"]), int(s["image_length"])
    length = s["hidden"].shape[0]
    attention, keys = s["attention"], s["keys"]
    base = {"attention": lambda rows: attention[:, torch.as_tensor(rows)], "keys": lambda: keys}
    return LLMContext(hidden=s["hidden"] if hidden is None else hidden,
                      visual=torch.arange(start, start + n) if visual is None else visual,
                      text_after=torch.arange(start + n, length), layer=layer, stage_index=stage, family="llava",
                      original_visual=n, providers={**base, **(providers or {})})
