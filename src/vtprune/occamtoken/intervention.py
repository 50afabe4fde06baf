"""The test-time register itself: while :func:`test_time_register` is active, the tower runs with the
register appended and the register neurons' activations redirected onto it (hooks only; nothing in
the model is changed). The sink then forms on the register instead of on (background) patches, and
the register scores inside the same softmax as the patches, which is what OccamToken's thresholds
compare against.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import InputError
from .neurons import RegisterNeurons, as_neurons
from .towers import MODES, RegisterTower, resolve_tower

__all__ = ["test_time_register"]


def _check_neurons(t: RegisterTower, rn: RegisterNeurons) -> dict[int, list[int]]:
    by_layer = rn.by_layer()
    L, width = t.num_layers, t.intermediate_size
    for layer, ns in by_layer.items():
        if not 0 <= layer < L:
            raise InputError(f"Register neuron layer {layer} is outside the tower's {L} blocks; these neurons "
                             f"belong to another tower ({rn.tower or 'unknown'}).")
        bad = [n for n in ns if not 0 <= n < width]
        if bad:
            raise InputError(f"Register neurons {bad} of layer {layer} are outside the MLP width {width}.")
    return by_layer


@contextlib.contextmanager
def test_time_register(tower: nn.Module, neurons: Any = None, mode: str = "per_channel") -> Iterator[int]:
    """While active, the tower runs with one test-time register (Jiang et al.; OccamToken Sec. 3.1).

    * CLIP: one zero token (no position embedding) is appended after the patches, before the pre-norm,
      so the tower's outputs and every ``hidden_states[i]`` hold ``1 + N + 1`` tokens: CLS, patches,
      register;
    * Qwen2.5-VL / Qwen3-VL: 4 zero tokens (one 2×2 merge group) after each image's N patches in the
      packed sequence (no position embedding, rotary position (0, 0), each image's attention segment
      grown by 4; see :class:`vtprune.models.qwen2_5_vl.QwenTower`): hidden states hold ``Σ (N_i + 4)`` rows, the merger's output
      (and every DeepStack feature) ``Σ (N_i / 4 + 1)`` rows — the register's merged token last per image;
    * in each listed block's MLP activation the listed channels are redirected onto the register
      (:func:`redirect_activations`, ``mode="per_channel"`` (the paper) or ``"signed_max"`` (the
      reference code)), per image — each LLaVA-NeXT crop is a batch element, so per crop; on Qwen the
      4 copies all receive the same values.

    neurons: a :class:`RegisterNeurons`, (layer, neuron) pairs, a ``{layer: [neurons]}`` dict, a JSON
    path, or None / empty (the register is still appended; nothing is redirected).
    Yields the number of register tokens appended per image (CLIP 1, Qwen 4). Hooks are removed on exit,
    also on error.
    """
    if mode not in MODES:
        raise InputError(f"Unknown register mode {mode!r}; choose one of {', '.join(MODES)}.")
    t = resolve_tower(tower)
    by_layer = _check_neurons(t, as_neurons(neurons))
    if getattr(t.core, "_vtprune_register_active", False):
        raise InputError("A test-time register is already active on this tower; nested registers are not supported.")
    handles = []
    try:
        handles.append(t.append_register_hook())
        for layer, ns in by_layer.items():
            handles.append(t.site(layer).register_forward_pre_hook(_redirect_hook(t, ns, mode)))
        t.core._vtprune_register_active = True
        yield t.register_copies
    finally:
        for h in handles:
            h.remove()
        t.core._vtprune_register_active = False


def _redirect_hook(t: RegisterTower, neurons: list[int], mode: str):
    cache: dict[torch.device, torch.Tensor] = {}

    def hook(module, args):
        h = args[0]
        ch = cache.get(h.device)
        if ch is None:
            ch = cache[h.device] = torch.tensor(neurons, dtype=torch.long, device=h.device)
        return (t.redirect(h, ch, mode), *args[1:])

    return hook
