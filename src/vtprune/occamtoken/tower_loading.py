"""Loading only the vision tower of a local Hugging Face model directory (for ``calibrate registers``)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, UnsupportedModelError
from .towers import resolve_tower

__all__ = ["load_vision_tower"]


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise InputError(f"Unknown dtype {name!r}; use float32, float16 or bfloat16.") from None


def _vision_class(vision_config):
    import importlib

    from ..models.families import all_families

    mt = getattr(vision_config, "model_type", "")
    for fam in all_families():
        if mt in fam.vision_classes:
            module, name = fam.vision_classes[mt]
            return getattr(importlib.import_module(module), name)
    known = sorted({k for f in all_families() for k in f.vision_classes})
    raise UnsupportedModelError(f"Vision towers of type {mt!r} are not supported ({', '.join(known)}).")


_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.visual.", "visual.")


def _load_tower_weights(path: Path, tower: nn.Module) -> bool:
    """Load only the vision-tower tensors of a VLM checkpoint into ``tower``; False if the names do not
    line up (the caller then loads the whole model)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return False
    expected = set(tower.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                for pre in _TOWER_PREFIXES:
                    if key.startswith(pre):
                        name = key[len(pre):]
                        if name not in expected and name.startswith("vision_model."):
                            name = name[len("vision_model."):]
                        if name in expected:
                            state[name] = sf.get_tensor(key)
                        break
    missing = expected - set(state)
    # buffers such as position_ids are not stored in checkpoints
    missing = {m for m in missing if not m.endswith("position_ids")}
    if missing or not state:
        return False
    tower.load_state_dict(state, strict=False)
    return True


def load_vision_tower(path: str | os.PathLike, device: str = "cpu",
                      dtype: str | torch.dtype | None = None) -> nn.Module:
    """The vision tower of a local HF directory: a VLM (LLaVA, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL — only the
    tower's tensors are read when the names line up) or a CLIP / CLIP-vision checkpoint. Eval mode."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--model {str(path)!r} is not a directory holding a Hugging Face model.")
    dt = dtype if isinstance(dtype, torch.dtype) else _dtype(dtype, device)
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    vc = getattr(cfg, "vision_config", None)
    if cfg.model_type in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel.from_pretrained(str(path), dtype=dt, local_files_only=True)
    elif vc is not None:
        cls = _vision_class(vc)
        tower = cls._from_config(vc, dtype=dt) if hasattr(cls, "_from_config") else cls(vc)
        if not _load_tower_weights(path, tower):
            from transformers import AutoModelForImageTextToText

            full = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dt, local_files_only=True)
            tower = resolve_tower(full).core
    else:
        raise UnsupportedModelError(f"{str(path)!r} ({cfg.model_type}) is neither a VLM nor a CLIP vision model.")
    return tower.to(device=device, dtype=dt).eval()
