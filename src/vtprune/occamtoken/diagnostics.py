"""The paper's sanity number for a test-time register: ``n_eff = exp(H(CLS attention))`` (42 -> 281 on
LLaVA-1.5's CLIP) without and with the register. CLS towers only (Qwen towers have no CLS token).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .intervention import test_time_register
from .towers import resolve_tower

__all__ = ["cls_attention_probs", "effective_attended_tokens", "register_diagnostic"]


class _Stop(Exception):
    pass


@torch.no_grad()
def cls_attention_probs(tower: nn.Module, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """(B, H, S) fp32 attention probabilities of the CLS query at block ``layer`` (over every key: CLS,
    patches and — inside :func:`test_time_register` — the register), without switching the tower to
    eager attention: the block's input is captured and ``softmax(q_cls · kᵀ · head_dim^-0.5)`` is
    computed from its own ``layer_norm1``, ``q_proj`` and ``k_proj`` (the tower stops after that block's
    input is known). ``layer=-2`` is the block producing LLaVA's ``vision_feature_layer=-2`` features."""
    t = resolve_tower(tower)
    L = t.num_layers
    if not -L <= layer < L:
        raise InputError(f"layer={layer} is outside the tower's {L} blocks.")
    idx = layer % L
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args):
        captured["x"] = args[0]
        raise _Stop

    handle = t.layers[idx].register_forward_pre_hook(grab)
    try:
        t.run(t.prepare(pixel_values))
    except _Stop:
        pass
    finally:
        handle.remove()
    return t.cls_attention(idx, captured["x"])


def effective_attended_tokens(cls_attention_probs: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """``n_eff = exp(H(p))``, the support size of a uniform distribution with the entropy of ``p``
    (OccamToken Sec. 3.2, Observation 1).

    cls_attention_probs: ``(K,)`` (already head-averaged), ``(H, K)`` or ``(B, H, K)`` attention
    probabilities over the K tokens of interest; each row is renormalised over those K first (so a
    caller may pass a column subset, e.g. the patches only).
    per_head=False (default, as the paper's stage-I scores): entropy of the **head-mean** distribution;
    per_head=True: ``exp(H)`` of each head, then averaged over heads.
    Returns a 0-d tensor for (K,) / (H, K) input, (B,) for (B, H, K).
    """
    p = cls_attention_probs.float()
    if p.dim() == 1:
        p = p[None, None]
        squeeze = 2
    elif p.dim() == 2:
        p = p[None]
        squeeze = 1
    elif p.dim() == 3:
        squeeze = 0
    else:
        raise InputError(f"Expected (K,), (H, K) or (B, H, K) probabilities, got shape {tuple(p.shape)}.")
    if not per_head:
        p = p.mean(1, keepdim=True)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (B, H')
    n = torch.exp(ent).mean(1)  # (B,)
    return n[0] if squeeze else n


@torch.no_grad()
def register_diagnostic(tower: nn.Module, pixel_values: torch.Tensor, neurons: Any = None, layer: int = -2,
                        mode: str = "per_channel", per_head: bool = False,
                        patches_only: bool = True) -> dict[str, Any]:
    """``n_eff`` of the CLS attention at block ``layer`` without and with the test-time register
    (the paper: 42 → 281 on LLaVA-1.5's CLIP at the feature layer).

    patches_only=True (default): the distribution over the patch tokens only (CLS and register columns
    dropped, renormalised) — "the CLS→vision attention distribution"; False: the full row.
    Returns ``{"n_eff_without", "n_eff_with"}`` (means over the batch), the per-image lists, the mean
    head-averaged CLS→register attention (``register_attention``), and the layer and patch count.
    """
    without = cls_attention_probs(tower, pixel_values, layer)
    with test_time_register(tower, neurons, mode=mode):
        with_reg = cls_attention_probs(tower, pixel_values, layer)
    n = without.shape[-1] - 1
    a = without[..., 1:] if patches_only else without
    b = with_reg[..., 1:-1] if patches_only else with_reg
    ne_without = effective_attended_tokens(a, per_head=per_head)
    ne_with = effective_attended_tokens(b, per_head=per_head)
    return {
        "n_eff_without": float(ne_without.mean()),
        "n_eff_with": float(ne_with.mean()),
        "per_image_without": [float(v) for v in ne_without],
        "per_image_with": [float(v) for v in ne_with],
        "register_attention": float(with_reg[..., -1].mean()),
        "num_patches": n,
        "layer": layer,
    }
