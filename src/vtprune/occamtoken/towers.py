"""The vision-tower interface of test-time registers, and the tensor operation every tower applies.

:class:`RegisterTower` says where a tower family keeps its blocks, its MLP activation and its token
layout, and how it appends the register; each model family declares its subclass
(``Family.register_tower`` in ``vtprune/models/``) and :func:`resolve_tower` finds it through the
family registry. :func:`redirect_activations` moves the register neurons' activations from the
patches onto the register (OccamToken Eq. 9); :func:`tower_identity` names a tower's exact weights.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import InputError, UnsupportedModelError

__all__ = ["RegisterTower", "first_param", "redirect_activations", "resolve_tower", "tower_identity", "MODES"]

MODES = ("per_channel", "signed_max")


def _mlp_site(block: nn.Module) -> nn.Module:
    """The module whose *input* is the MLP activation (output of the activation function, width =
    intermediate size): CLIP ``fc2``; Qwen3-VL ``linear_fc2``; Qwen2.5-VL ``down_proj`` (input =
    act(gate)·up, the gated analogue)."""
    mlp = block.mlp
    for name in ("fc2", "linear_fc2", "down_proj"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise UnsupportedModelError(f"Cannot find the MLP output projection of {type(block).__name__}.")


def first_param(module: nn.Module) -> torch.nn.Parameter:
    return next(module.parameters())


class RegisterTower:
    """What calibration and the intervention need to know about a tower family."""

    kind = ""
    has_cls = False
    register_copies = 1  # register tokens appended per image (Qwen: 4 = one 2×2 merge group)
    batched = False  # hidden states are (B, S, D) per image batch (calibration may micro-batch them)

    def __init__(self, core: nn.Module):
        self.core = core

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether ``module`` is a vision tower of this kind."""
        return False

    def processor_batch(self, out: Mapping[str, Any]) -> Any:
        """The calibration batch of an image processor's output."""
        return out["pixel_values"]

    @property
    def config(self):
        return self.core.config

    @property
    def layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def site(self, layer: int) -> nn.Module:
        return _mlp_site(self.layers[layer])

    @property
    def intermediate_size(self) -> int:
        return int(self.site(0).in_features)

    def prepare(self, batch: Any) -> dict[str, Any]:
        raise NotImplementedError

    def num_images(self, batch: dict[str, Any]) -> int:
        raise NotImplementedError

    def run(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def split(self, t: torch.Tensor, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per-image (S_i, C) views of a recorded (B, S, C) or packed (S, C) tensor."""
        raise NotImplementedError

    def identity_fields(self) -> list[str]:
        c = self.config
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "depth", None)
        parts = [str(getattr(c, "model_type", type(self.core).__name__)), f"h{c.hidden_size}", f"l{layers}"]
        if getattr(c, "image_size", None):
            parts.append(f"img{c.image_size}")
        parts.append(f"p{c.patch_size}")
        return parts

    def identity_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- intervention (families that support it override these) -------------------------------
    def append_register_hook(self) -> torch.utils.hooks.RemovableHandle:
        raise UnsupportedModelError(
            f"Test-time registers are not implemented for {self.kind} vision towers yet (they need "
            f"{self.register_copies} register copies per image threaded through the packed sequence); "
            "calibration and tower_identity work.")

    def redirect(self, h: torch.Tensor, channels: torch.Tensor, mode: str) -> torch.Tensor:
        raise UnsupportedModelError(f"Test-time registers are not implemented for {self.kind} towers yet.")

    def cls_attention(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModelError(f"{self.kind} towers have no CLS token.")


class _Handles:
    """Several hook handles removed together."""

    def __init__(self, handles):
        self.handles = list(handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _insert_after_segments(t: torch.Tensor, sizes: Sequence[int], copies: int, fill: float = 0, dim: int = 0):
    """Insert ``copies`` rows of ``fill`` after each segment (of the given sizes) along ``dim``."""
    parts = []
    for seg in t.split([int(n) for n in sizes], dim=dim):
        shape = list(seg.shape)
        shape[dim] = copies
        parts += [seg, torch.full(shape, fill, dtype=seg.dtype, device=seg.device)]
    return torch.cat(parts, dim=dim)


def _tower_classes() -> list[type[RegisterTower]]:
    """The tower adapters the model families declare (``Family.register_tower``), each once."""
    from ..models.families import all_families

    out: list[type[RegisterTower]] = []
    for fam in all_families():
        if fam.register_tower is not None and fam.register_tower not in out:
            out.append(fam.register_tower)
    return out


def _tower_names() -> str:
    from ..models.families import all_families

    return ", ".join(f.display_name for f in all_families() if f.register_tower is not None)


def resolve_tower(model: nn.Module, _depth: int = 0) -> RegisterTower:
    """The tower adapter of a vision tower, or of a VLM that holds one."""
    if isinstance(model, RegisterTower):
        return model
    for cls in _tower_classes():
        if cls.matches(model):
            return cls(model)
    if _depth < 4:
        for name in ("vision_model", "vision_tower", "visual", "model"):
            sub = getattr(model, name, None)
            if isinstance(sub, nn.Module):
                try:
                    return resolve_tower(sub, _depth + 1)
                except UnsupportedModelError:
                    pass
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported vision tower (those of {_tower_names()}) and holds none.")


def tower_identity(tower: nn.Module) -> str:
    """A stable string naming the tower's architecture and its exact weights, e.g.
    ``clip_vision_model-h1024-l24-img336-p14-3fa9c2e01b7d``.

    The architecture part comes from the config (model_type, hidden size, layers, image size, patch
    size); the suffix is a 12-hex SHA-256 of a few weight tensors (patch embedding, class / position
    embeddings, first fc1 / last fc2 weight, every layer's fc1 bias for CLIP; the analogues for Qwen),
    taken in bfloat16 so that the same checkpoint loaded in fp32, fp16 or bf16, on any device, gives
    the same identity.
    """
    t = resolve_tower(tower)
    h = hashlib.sha256()
    for w in t.identity_tensors():
        if w is None:
            continue
        if w.is_meta:
            raise InputError("tower_identity needs materialised weights (this tower is on the meta device).")
        x = w.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(str(tuple(x.shape)).encode())
        h.update(x.view(torch.int16).numpy().tobytes())
    return "-".join(t.identity_fields() + [h.hexdigest()[:12]])


def redirect_activations(h: torch.Tensor, channels: torch.Tensor, patch: slice = slice(1, -1),
                         register: slice = slice(-1, None), mode: str = "per_channel") -> torch.Tensor:
    """Move register-neuron activations from the patches onto the register (returns a new tensor).

    h: (B, S, I) MLP activations; positions ``patch`` are the patch tokens, ``register`` the register
    copies; anything else (CLS) is untouched. For each batch element separately:

    * ``per_channel`` (OccamToken Eq. 9 / Algorithm 1): for each listed channel k,
      ``h[r, k] = max over patch tokens of h[i, k]``, then ``h[i, k] = 0`` on the patch tokens;
    * ``signed_max`` (the reference code's ``activate_on_registers`` with ``sign_max``): one scalar for
      all listed channels of the layer — the entry of largest magnitude, with its sign, of
      ``h[:, channels]`` over **all** positions (CLS, patches and the register's own activation) and all
      those channels (``max`` if ``|max| > |min|`` else ``min``) — written to every listed channel of the
      register; the patches' listed channels are zeroed. (The reference applies it to batch element 0
      only; here each batch element / crop gets its own.)
    """
    if mode not in MODES:
        raise InputError(f"Unknown register mode {mode!r}; choose one of {', '.join(MODES)}.")
    if channels.numel() == 0:
        return h
    out = h.clone()
    sub = out[:, :, channels]  # (B, S, C) copy
    patches = sub[:, patch]
    if patches.shape[1] == 0:
        raise InputError("The tower produced no patch tokens to take the maximum over.")
    if mode == "per_channel":
        reg = patches.amax(dim=1)  # (B, C)
    else:
        flat = sub.flatten(1)
        hi, lo = flat.amax(1), flat.amin(1)
        val = torch.where(hi.abs() > lo.abs(), hi, lo)
        reg = val[:, None].expand(-1, sub.shape[2])
    sub[:, patch] = 0
    sub[:, register] = reg[:, None, :].to(sub.dtype)
    out[:, :, channels] = sub
    return out
