"""``ocvtp`` — OC-VTP: Li, Zhao, Deng, Wang, Pajarinen, "Object-Centric Vision Token Pruning for Vision
Language Models", arXiv 2511.20439. Official code: GarryLarry010131/OC-VTP (``OC_LLaVA`` in
``LLaVA/llava/model/ocl_model.py``, the wrapper its README evaluates with).

A small trained pruner (slot attention, :mod:`vtprune.ocvtp.pruner`) reads the vision tower's hidden
states after a middle block (block 9 of 24 for LLaVA-1.5's CLIP tower: ``OCL_LAYER_IDX=8``), CLS removed.
The defaults follow the README's evaluation setting (``OCL_HAS_CLS=1``, ``OCL_TOPK=1``,
``OCL_PAD_MODE=att_score``, ``OCL_ATTSEL=meanq``):

1. keep + 1 slots run (``cls_slot=True``; the public code's target is keep + 1 because the CLS row
   takes one place); each slot nominates its argmax token.
2. The nominated tokens and CLS form the kept set. When all keep + 1 slots nominate different tokens
   the set has keep + 2 members and the public code cuts it to keep + 1 in CPython ``set`` iteration
   order — an arbitrary order (hash-table slots), reproduced by default (``truncate="set_order"``, one
   read-back of the keep + 1 nominated indices per image); ``truncate="attention"`` drops the nominee
   with the weakest slot attention instead, without a read-back.
3. If fewer than keep + 1, the set is filled with the tokens receiving the most attention at the
   feature layer (mean over heads and over all queries, CLS included), highest first.
4. LLaVA's feature selection drops the CLS row: keep patch tokens remain, taken from the feature layer
   (``hidden_states[-2]``) before the projector. The whole tower still runs.

``cls_slot=False`` runs keep slots (no CLS place). ``fill="slots"`` ranks the fill by slot-attention
mass instead of the feature layer's attention.

Slot noise (``noise``): the public code draws fresh Gaussian slot noise on every call, so one image's
selection changes from call to call and depends on how many draws came before. The default
``noise="fixed"`` draws it from a generator seeded with ``seed`` — exactly the public code's draw after
``torch.manual_seed(seed)`` — so a selection is reproducible and independent of the batch and of call
order; averaging over ``seed`` gives the public code's expected behaviour. ``noise="per_call"`` draws
from the global RNG per call, as the public code.

Usage: ``vtprune.apply(model, "ocvtp", keep=64, checkpoint="path/to/checkpoint")``. Without
``checkpoint`` a checkpoint shipped with vtprune is used when one was trained for this tower (the demo
model's); otherwise the error says how to train one (``vtprune ocvtp extract`` / ``train``).

Per family:
* LLaVA-1.5: 576 candidates of one crop — the setting the public code implements.
* LLaVA-NeXT: the public code has no working path (``OC_LLaVA`` merges every crop's nominations into one
  index set of a single crop's index space, fills it from the first crop's attention and cuts that set
  out of every crop, which LLaVA's AnyRes merge then cannot reshape to its grid).
  vtprune runs one pruner pass over all crops' candidates concatenated (base + high-res crops, after
  unpadding), so slot competition spreads the budget over crops [decision]; the indices are into the
  concatenation, which the adapter maps back to crops. The CLS rule of step 2 is applied once per
  image; the fill uses each crop's own feature-layer attention. The pruner carries no position
  embedding, so a LLaVA-1.5 checkpoint of the same CLIP tower serves LLaVA-NeXT.
* Qwen2.5-VL / Qwen3-VL: no public code. Merged-unit space (each unit the mean of its 2×2 patch features
  at the middle block, raster order); the merger outputs at the kept units enter the LLM at their
  original M-RoPE positions. Needs a pruner trained on that tower (width 1280 for Qwen2.5-VL). The
  keep + 1 slot rule is kept (the tower has no CLS; the extra slot only adds a nominee).

Remaining differences from the public code on LLaVA-1.5 (besides those of :mod:`vtprune.ocvtp.pruner`):

* Exact ties: the public code's fill order is ``torch.argsort`` (unstable) of the attention; vtprune
  breaks ties by the lower index. Ties of float attention do not occur in practice.
* Positions: the public code cuts the tokens inside the vision tower and LLaVA numbers the kept tokens
  contiguously; vtprune keeps that (``default_positions = "contiguous"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from ..errors import ArgumentError, UnsupportedMethodError
from .base import Method, Selection, Stage, register_method

_CACHE: dict[tuple, object] = {}  # (path, device, mtime) → loaded pruner


def _set_order_cut(nominated: torch.Tensor, keep: int, n: int) -> torch.Tensor | None:
    """(1, n) bool: the nominated candidates the public code cuts, or None when it cuts none.

    ``compress_tokens_by_slots`` puts the slots' tokens (in slot order, shifted by one for the CLS row)
    into a Python ``set``, adds the CLS index 0, keeps ``list(set)[:keep + 1]`` and sorts; LLaVA's
    ``feature_select("patch")`` then drops the first row. When every slot nominates its own token that
    set has keep + 2 members and CPython's iteration order (hash-table slots) decides which one goes:
    this replays it with the interpreter's own ``set``. The indices are read back once per image.
    """
    ids = [i + 1 for i in nominated.tolist()]  # sync: the public code cuts its token set in CPython set order
    pick = set(ids)
    pick.add(0)
    survivors = set(sorted(list(pick)[:keep + 1])[1:])
    cut = [i - 1 for i in set(ids) - survivors]  # host: Python ints read back above
    if not cut:
        return None
    return torch.zeros(1, n, dtype=torch.bool, device=nominated.device).index_fill_(
        1, torch.as_tensor(cut, device=nominated.device), True)


def _load(path: Path, device: torch.device):
    from ..ocvtp.pruner import load_pruner

    weights = path / "pruner.safetensors" if path.is_dir() else path
    key = (str(path.resolve()), str(device), weights.stat().st_mtime_ns if weights.exists() else 0)
    if key not in _CACHE:
        _CACHE[key] = load_pruner(path, map_location=device)
    return _CACHE[key]


@register_method
class OCVTP(Method):
    name = "ocvtp"
    needs_budget = True
    default_positions = "contiguous"
    official_code = ("GarryLarry010131/OC-VTP@1755633bd67dd1bcb24e10ad7b189e1ec85d822b "
                     "LLaVA/llava/model/ocl_model.py::OC_LLaVA.compress_tokens_by_slots")
    stages = (Stage.VISION,)

    def __init__(self, keep: int | None = None, ratio: float | None = None, seed: int = 0,
                 checkpoint: str | Path | None = None, layer: int | None = None,
                 noise: Literal["fixed", "per_call"] = "fixed", cls_slot: bool = True,
                 truncate: Literal["set_order", "attention"] = "set_order",
                 fill: Literal["attention", "slots"] = "attention"):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if fill not in ("attention", "slots"):
            raise ArgumentError(f"ocvtp: fill={fill!r} is not allowed; choose 'attention' or 'slots'.")
        if layer is not None and layer <= 0:  # its type is checked from the annotation
            raise ArgumentError(f"ocvtp: layer={layer!r} is not allowed; layer is a positive hidden_states index.")
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.layer_override = layer
        if noise not in ("fixed", "per_call"):
            raise ArgumentError(f"ocvtp: noise={noise!r} is not allowed; choose 'fixed' or 'per_call'.")
        self.noise = noise
        self.cls_slot = bool(cls_slot)
        if truncate not in ("set_order", "attention"):
            raise ArgumentError(f"ocvtp: truncate={truncate!r} is not allowed; choose 'set_order' or 'attention'.")
        self.truncate = truncate
        self.fill = fill
        self._config = None
        self._identity: dict | None = None  # the tower, set by load_resources (vLLM: none)
        self._depth: int | None = None
        self._resolved_for: tuple | None = None
        if self.checkpoint is not None:
            from ..ocvtp.pruner import read_config

            self._config = read_config(self.checkpoint)  # fail early on a bad path

    # -- checkpoint resolution ---------------------------------------------------------------------
    def load_resources(self, adapter) -> None:
        """Find and read the checkpoint for this model's tower and check it against the tower, before
        the model is patched (a missing or unfitting checkpoint raises CheckpointError here)."""
        from ..ocvtp.extract import tower_depth, tower_identity

        self._identity, self._depth = tower_identity(adapter.model), tower_depth(adapter.model)
        self._resolved_for = None
        self._resolve(adapter.family, self._identity["hidden_size"])

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
        from ..ocvtp.pruner import select_from_attention, slot_count

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
            slots = slot_count(k, self.cls_slot)
            _, attn = pruner(tokens.float().unsqueeze(0), slots, seed=self.seed, noise=self.noise)
            exclude = None
            if self.truncate == "set_order":
                exclude = _set_order_cut(attn[0].argmax(dim=1), k, attn.shape[-1])
            keep = select_from_attention(attn, k, fill_scores, exclude)[0]
        # tokens some slot nominated, counted on the device (torch.unique would read its size back)
        nominated = torch.zeros(attn.shape[-1], dtype=torch.bool, device=attn.device).index_fill_(
            0, attn[0].argmax(dim=1), True).sum()
        filled = (k - nominated).clamp_min(0)
        return Selection(keep=keep, info={"slots": slots, "nominated": nominated, "filled": filled,
                                          "layer": self.layer})

    def describe(self) -> str:
        budget = f"keep={self.keep}" if self.keep is not None else f"ratio={self.ratio}" if self.ratio else ""
        ckpt = f", checkpoint={self.checkpoint}" if self.checkpoint is not None else ""
        return f"{self.name}({budget}{ckpt})"
