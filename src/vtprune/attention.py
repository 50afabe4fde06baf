"""Attention probabilities of chosen query rows, without switching the model to eager attention.

Attention-score methods need one layer's scores, usually a few query rows (the CLS token, the last
token, the text tokens). Instead of running the whole model in eager mode we route exactly one
attention module, for one call, through a capturing attention function: it keeps the query and key
states the module produced (after its own norm, projections, q/k-norm and RoPE — whatever the family
does) and then delegates the actual attention output to the model's own implementation (SDPA,
FlashAttention, ...). Rows are then computed on demand in fp32 with the module's scaling, its GQA
layout, the causal/padding mask and a full softmax.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE_IMPLEMENTATION = "vtprune_capture"


@dataclass
class AttentionCall:
    """The tensors of one attention call: query (B, H, Lq, d), key (B, Hkv, Lk, d) after RoPE."""

    query: torch.Tensor
    key: torch.Tensor
    mask: torch.Tensor | None  # as handed to the attention function (bool: True = attend, or additive)
    scaling: float
    causal: bool

    def rows(self, batch: int, rows: torch.Tensor | list[int] | None = None,
             columns: torch.Tensor | None = None) -> torch.Tensor:
        """(H, R, Lk) fp32 probabilities of query rows ``rows`` (all rows if None) of batch element
        ``batch``. ``columns`` restricts the keys to a subset *before* the softmax (used to drop
        padding columns); by default the full row as the model computes it."""
        q = self.query[batch].float()
        k = self.key[batch].float()
        heads, kv_heads = q.shape[0], k.shape[0]
        if heads != kv_heads:
            k = k.repeat_interleave(heads // kv_heads, dim=0)
        rows_t = torch.arange(q.shape[1], device=q.device) if rows is None else torch.as_tensor(
            rows, device=q.device, dtype=torch.long)
        scores = torch.einsum("hrd,hkd->hrk", q[:, rows_t], k) * self.scaling
        blocked = self._blocked(batch, rows_t, k.shape[1], q.shape[1])
        if columns is not None:
            outside = torch.ones(k.shape[1], dtype=torch.bool, device=q.device)
            outside[columns] = False
            blocked = outside if blocked is None else blocked | outside
        if blocked is not None:
            scores = scores.masked_fill(blocked, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def _blocked(self, batch: int, rows: torch.Tensor, lk: int, lq: int) -> torch.Tensor | None:
        """(R, Lk) True where query row ``rows[r]`` may not attend (None: nowhere)."""
        if self.mask is not None:
            m = self.mask[batch if self.mask.shape[0] > 1 else 0]
            m = m[0] if m.dim() == 3 else m  # (heads=1, Lq, Lk)
            m = m[rows] if m.shape[0] == lq else m.expand(len(rows), -1)
            return ~m if m.dtype == torch.bool else ~(m > torch.finfo(m.dtype).min / 2)
        if self.causal and lq > 1:
            offset = lk - lq
            key_pos = torch.arange(lk, device=rows.device)
            return key_pos.unsqueeze(0) > (rows + offset if offset else rows).unsqueeze(1)
        return None


@dataclass
class AttentionRecorder:
    """Collects the calls of one attention module while :func:`record_attention` is active."""

    calls: list[AttentionCall] = field(default_factory=list)

    @property
    def last(self) -> AttentionCall:
        if not self.calls:
            raise RuntimeError("The attention module was not called while recording.")
        return self.calls[-1]


def _capture_forward(module, query, key, value, attention_mask, *args, **kwargs):
    recorder, implementation = module._vtprune_capture
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    recorder.calls.append(AttentionCall(query.detach(), key.detach(), attention_mask, float(scaling),
                                        bool(causal)))
    return implementation(module, query, key, value, attention_mask, *args, **kwargs)


ALL_ATTENTION_FUNCTIONS.register(CAPTURE_IMPLEMENTATION, _capture_forward)


def _implementation_of(config) -> callable:
    name = config._attn_implementation or "eager"
    if name == "eager" or name not in ALL_ATTENTION_FUNCTIONS:
        # the eager function lives in each modeling module; we find it at call time instead
        return None
    return ALL_ATTENTION_FUNCTIONS[name]


#: per attention module: (its config, the copy that routes attention through the capture function)
_CAPTURE_CONFIGS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _capture_config(attn_module: nn.Module, original_config):
    """A shallow copy of ``original_config`` whose attention implementation is the capture function.
    Made once per module (copying a config costs more than the rest of a recording) and refreshed from
    the original on every use, so a change made to the original since is seen."""
    cached = _CAPTURE_CONFIGS.get(attn_module)
    if cached is None or cached[0] is not original_config:
        cached = (original_config, copy.copy(original_config))
        _CAPTURE_CONFIGS[attn_module] = cached
    capture_config = cached[1]
    # plain attribute reads and writes: configs route every attribute access through Python code (slow),
    # their __setattr__ validates, and this copy is ours
    state = object.__getattribute__(capture_config, "__dict__")
    state.update(object.__getattribute__(original_config, "__dict__"))
    state["_attn_implementation_internal"] = CAPTURE_IMPLEMENTATION
    return capture_config


@contextlib.contextmanager
def record_attention(attn_module: nn.Module) -> Iterator[AttentionRecorder]:
    """Record the query/key states of ``attn_module`` (an HF attention module with a ``config``)
    for the duration of the block. The module's own attention implementation still computes its
    output, so the model's numbers are unchanged."""
    original_config = getattr(attn_module, "config", None)
    if original_config is None:
        raise TypeError(f"{type(attn_module).__name__} has no config; cannot route its attention.")
    recorder = AttentionRecorder()
    outer = attn_module.__dict__.get("_vtprune_capture")  # already recorded: nest, then hand it back
    implementation = outer[1] if outer is not None else _implementation_of(original_config)
    if implementation is None:
        import sys

        implementation = getattr(sys.modules[type(attn_module).__module__], "eager_attention_forward")
    capture_config = _capture_config(attn_module, original_config) if outer is None else original_config
    # plain instance attributes (neither parameters, buffers nor submodules): written straight into the
    # module's __dict__, which is what nn.Module.__setattr__ ends up doing after its type checks
    state = attn_module.__dict__
    state["config"] = capture_config
    state["_vtprune_capture"] = (recorder, implementation)
    try:
        yield recorder
    finally:
        state["config"] = original_config
        if outer is None:
            del state["_vtprune_capture"]
        else:
            state["_vtprune_capture"] = outer
