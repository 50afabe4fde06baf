"""Per-call statistics: what was kept, at which stage, and what the method itself cost."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class ImageStats:
    candidates: int  # prunable visual tokens of the image (patches; no newline tokens, no registers)
    after_pre_llm: int  # patch tokens that entered the LLM (no registers, no newline tokens)
    registers: int = 0  # register tokens that entered the LLM with the image
    newlines: int = 0  # LLaVA-NeXT newline tokens that entered the LLM with the image
    info: dict = field(default_factory=dict)
    #: (crop, row, col) of the patches that entered the LLM / that remained after in-LLM pruning
    entering_cells: list[tuple[int, int, int]] = field(default_factory=list)
    kept_cells: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def visual_tokens(self) -> int:
        """Every visual token of the image that entered the LLM: patches, registers, newline tokens."""
        return self.after_pre_llm + self.registers + self.newlines


@dataclass
class CallStats:
    """One pruned prefill.

    images:       per image, in the order they appear in the batch.
    llm_stages:   per sample, {layer: visual tokens kept from that layer on} (in-LLM methods).
    method_seconds: wall time spent inside the method's selection code (GPU synchronised).
    total_seconds:  wall time of the whole prefill call, model included.
    """

    method: str
    positions: str = "original"  # "original" or "contiguous": how the LLM numbered the pruned sequence
    images: list[ImageStats] = field(default_factory=list)
    llm_stages: dict[int, dict[int, int]] = field(default_factory=dict)
    llm_info: dict[int, dict[int, dict]] = field(default_factory=dict)  # method info per sample and layer
    method_seconds: float = 0.0
    total_seconds: float = 0.0
    #: per sample, the input columns whose visual tokens remained after every stage (registers,
    #: which have no input column of their own, show as the column of the image's last unit)
    kept_columns: list[list[int]] = field(default_factory=list)
    #: the same for the visual tokens that entered the LLM (before in-LLM pruning)
    entering_columns: list[list[int]] = field(default_factory=list)
    #: in-LLM methods: {layer: per sample, the input columns whose visual tokens remain from that layer on}
    stage_columns: dict[int, list[list[int]]] = field(default_factory=dict)

    @contextlib.contextmanager
    def timer(self):
        _sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.method_seconds += time.perf_counter() - start

    def add_llm_stage(self, sample: int, layer: int, kept: int, info: dict | None = None) -> None:
        self.llm_stages.setdefault(sample, {})[layer] = kept
        if info:
            self.llm_info.setdefault(sample, {})[layer] = info

    @property
    def tokens_entering_llm(self) -> list[int]:
        """Visual tokens per image that entered the LLM: every one of them, registers and LLaVA-NeXT
        newline tokens included (``images[i].after_pre_llm`` counts the patches alone)."""
        return [im.visual_tokens for im in self.images]

    @property
    def patches_entering_llm(self) -> list[int]:
        """Patch tokens per image that entered the LLM (no registers, no newline tokens)."""
        return [im.after_pre_llm for im in self.images]

    def layer_averaged(self, num_layers: int, sample_images: list[list[int]] | None = None) -> list[float]:
        """Per sample: its visual tokens (registers and newline tokens included) averaged over the
        decoder's layers (equals the entering count for pre-LLM methods). ``sample_images`` maps
        samples to their images (default: one each)."""
        groups = sample_images or [[i] for i in range(len(self.images))]
        out = []
        for b, imgs in enumerate(groups):
            entering = sum(self.images[i].visual_tokens for i in imgs)
            never_pruned = sum(self.images[i].registers + self.images[i].newlines for i in imgs)
            stages = sorted(self.llm_stages.get(b, {}).items())
            total, current, start = 0.0, entering, 0
            for layer, kept in stages:
                total += current * (layer - start)
                current, start = kept + never_pruned, layer
            total += current * (num_layers - start)
            out.append(total / num_layers)
        return out

    def as_dict(self) -> dict:
        return asdict(self)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
