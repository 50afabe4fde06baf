"""``ocvtp`` — OC-VTP: Li, Zhao, Deng, Wang, Pajarinen, "Object-Centric Vision Token Pruning for Vision
Language Models", arXiv 2511.20439.

A small trained pruner (slot attention, :mod:`vtprune.ocvtp.pruner`) reads the vision tower's hidden
states after a middle block (block 9 of 24 for LLaVA-1.5's CLIP tower), runs K = budget slots, and keeps
the feature-layer token each slot attends to most; slots that share a token leave room that is filled
with the tokens receiving the most attention at the feature layer. The whole tower still runs; the kept
tokens are the feature layer's (``hidden_states[-2]`` for LLaVA), chosen before the projector.

Usage: ``vtprune.apply(model, "ocvtp", keep=64, checkpoint="path/to/checkpoint")``. Without
``checkpoint`` a checkpoint shipped with vtprune is used when one was trained for this tower (the demo
model's); otherwise the error says how to train one (``vtprune ocvtp extract`` / ``train``).

Per family:
* LLaVA-1.5: 576 candidates of one crop.
* LLaVA-NeXT: one pruner pass over all crops' candidates concatenated (base + high-res crops, after
  unpadding), so slot competition spreads the budget over crops [decision]; the indices are into the
  concatenation, which the adapter maps back to crops. The pruner carries no position embedding, so a
  LLaVA-1.5 checkpoint of the same CLIP tower serves LLaVA-NeXT.
* Qwen2.5-VL / Qwen3-VL: merged-unit space (each unit the mean of its 2×2 patch features at the middle
  block, raster order); the merger outputs at the kept units enter the LLM at their original M-RoPE
  positions. Needs a pruner trained on that tower (width 1280 for Qwen2.5-VL).

Deviations (besides those of :mod:`vtprune.ocvtp.pruner`): selection is deterministic by default
(``seed``; ``stochastic=True`` for the public code's random slot draw); K = budget slots (no CLS slot);
ties and truncation are resolved by attention rank, never by set order. The fill score is the mean
attention each candidate receives from all tokens at the feature layer, as in the public code's
default (``fill="slots"`` uses the slot-attention mass instead).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from ..errors import ArgumentError, UnsupportedMethodError
from .base import Method, Selection, Stage, register

_CACHE: dict[tuple, object] = {}  # (path, device, mtime) → loaded pruner


def _load(path: Path, device: torch.device):
    from ..ocvtp.pruner import load_pruner

    weights = path / "pruner.safetensors" if path.is_dir() else path
    key = (str(path.resolve()), str(device), weights.stat().st_mtime_ns if weights.exists() else 0)
    if key not in _CACHE:
        _CACHE[key] = load_pruner(path, map_location=device)
    return _CACHE[key]


@register
class OCVTP(Method):
    name = "ocvtp"
    needs_budget = True
    stages = (Stage.VISION,)

    def __init__(self, keep: int | None = None, ratio: float | None = None, seed: int = 0,
                 checkpoint: str | Path | None = None, layer: int | None = None, stochastic: bool = False,
                 fill: Literal["attention", "slots"] = "attention"):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if fill not in ("attention", "slots"):
            raise ArgumentError(f"ocvtp: fill={fill!r} is not allowed; choose 'attention' or 'slots'.")
        if layer is not None and layer <= 0:  # its type is checked from the annotation
            raise ArgumentError(f"ocvtp: layer={layer!r} is not allowed; layer is a positive hidden_states index.")
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.layer_override = layer
        self.stochastic = bool(stochastic)
        self.fill = fill
        self._config = None
        self._identity: dict | None = None  # the tower, when the adapter shows it (LLaVA families)
        self._depth: int | None = None
        self._resolved_for: tuple | None = None
        if self.checkpoint is not None:
            from ..ocvtp.pruner import read_config

            self._config = read_config(self.checkpoint)  # fail early on a bad path

    # -- checkpoint resolution ---------------------------------------------------------------------
    def vision_tower_patch(self, adapter):
        """Called by the LLaVA adapters before the tower runs: check the checkpoint against the tower."""
        from ..ocvtp.extract import tower_depth, tower_identity

        identity = tower_identity(adapter.model)
        if identity != self._identity:
            self._identity, self._depth, self._resolved_for = identity, tower_depth(adapter.model), None
        self._resolve(adapter.family, self._identity["hidden_size"])
        return None

    def _resolve(self, family: str, width: int):
        if self._resolved_for == (family, width) and self._config is not None:
            return self._config
        from ..ocvtp import CheckpointError, checkpoint_dir, shipped_checkpoints
        from ..models.families import tower_group
        from ..ocvtp.extract import same_tower

        if self.checkpoint is None:
            candidates = []
            for name, cfg in shipped_checkpoints().items():
                tower = cfg.tower
                if not tower or cfg.input_dim != width:
                    continue
                fams = {tower.get("family"), family}
                if len({tower_group(f) for f in fams}) != 1:  # families sharing a tower (LLaVA-1.5 / -NeXT)
                    continue
                if self._identity is not None and not same_tower(tower, self._identity):
                    continue
                candidates.append(name)
            if len(candidates) != 1:
                what = "no" if not candidates else "more than one"
                raise CheckpointError(
                    f"ocvtp: {what} checkpoint shipped with vtprune fits this {family} vision tower "
                    f"(width {width}{'; ' + ', '.join(candidates) if candidates else ''}). Train one on this "
                    f"model's tower — `vtprune ocvtp extract --model PATH --images DIR --out FEATS` then "
                    f"`vtprune ocvtp train --features FEATS --out CKPT` — and pass checkpoint=CKPT.")
            self.checkpoint = checkpoint_dir() / candidates[0]
            self._config = None
        if self._config is None:
            from ..ocvtp.pruner import read_config

            self._config = read_config(self.checkpoint)
        cfg = self._config
        if cfg.input_dim != width:
            raise CheckpointError(
                f"ocvtp: the checkpoint {self.checkpoint} takes {cfg.input_dim}-d tokens but this {family} vision "
                f"tower is {width}-d. Train a pruner for this tower: `vtprune ocvtp extract --model PATH "
                f"--images DIR --out FEATS` then `vtprune ocvtp train --features FEATS --out CKPT`.")
        if self._identity is not None and cfg.tower and not same_tower(cfg.tower, self._identity):
            import warnings

            warnings.warn(f"ocvtp: the checkpoint {self.checkpoint} was trained on another vision tower "
                          f"({cfg.tower.get('family')}, depth {cfg.tower.get('depth')}); its selections may be poor.",
                          stacklevel=3)
        layer = self.layer
        depth = self._depth
        if depth is not None and layer > depth:
            raise CheckpointError(f"ocvtp: the checkpoint reads the output of block {layer} but this vision tower "
                                  f"has {depth} blocks; pass layer= or train a pruner for this tower.")
        self._resolved_for = (family, width)
        return cfg

    @property
    def layer(self) -> int:
        """hidden_states index the pruner reads (the output of block ``layer``)."""
        if self.layer_override is not None:
            return self.layer_override
        if self._config is None:
            raise UnsupportedMethodError("ocvtp: no checkpoint resolved yet.")
        return self._config.layer

    # -- selection --------------------------------------------------------------------------------
    def select_vision(self, ctx):
        from ..ocvtp import CheckpointError
        from ..ocvtp.pruner import select_from_attention

        k = self.budget(ctx.num_tokens)
        cfg = self._resolve(ctx.family, ctx.features.shape[-1])
        try:
            tokens = ctx.hidden(self.layer - 1)
        except (IndexError, KeyError):
            raise CheckpointError(f"ocvtp: this vision tower has no block {self.layer} (the checkpoint's layer); "
                                  f"pass layer= or train a pruner for this tower.") from None
        if tokens.shape != (ctx.num_tokens, cfg.input_dim):
            raise CheckpointError(f"ocvtp: the tower's block {self.layer} gives {tuple(tokens.shape)} tokens; the "
                                  f"pruner expects ({ctx.num_tokens}, {cfg.input_dim}).")
        pruner = _load(Path(self.checkpoint), tokens.device)
        fill_scores = None
        if self.fill == "attention":
            try:
                fill_scores = ctx.received_attention.reshape(1, -1)
            except UnsupportedMethodError:
                fill_scores = None  # the slot-attention mass is used instead
        with torch.no_grad():
            _, attn = pruner(tokens.float().unsqueeze(0), k, seed=self.seed, stochastic=self.stochastic)
            keep = select_from_attention(attn, k, fill_scores)[0]
        # tokens some slot nominated, counted on the device (torch.unique would read its size back)
        nominated = torch.zeros(attn.shape[-1], dtype=torch.bool, device=attn.device).index_fill_(
            0, attn[0].argmax(dim=1), True).sum()
        return Selection(keep=keep, info={"slots": k, "nominated": nominated, "filled": k - nominated,
                                          "layer": self.layer})

    def describe(self) -> str:
        budget = f"keep={self.keep}" if self.keep is not None else f"ratio={self.ratio}" if self.ratio else ""
        ckpt = f", checkpoint={self.checkpoint}" if self.checkpoint is not None else ""
        return f"{self.name}({budget}{ckpt})"
