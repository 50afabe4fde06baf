"""Decoding steps after a pruned prefill: the caller's attention mask and positions, which still count
the original tokens, are mapped onto the compacted KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .positions import as_rows


@dataclass
class Session:
    """Bookkeeping for one KV cache produced by a pruned prefill."""

    compact_mask: torch.Tensor  # (B, Lc) mask of the compact prompt in the cache
    original_prompt_len: int  # columns of the caller's prompt attention mask
    original_seen: int  # original tokens seen so far (for default positions)
    #: (B,) added to the caller's decoding positions when the prefill laid images out with another
    #: token count than the caller's input (LLaVA-NeXT layout="flat"); None when the counts agree
    position_shift: torch.Tensor | None = None


def continue_session(adapter, forward, kwargs, session: Session):
    """Run ``forward`` (the model's own) for a call that continues ``session``'s cache."""
    mask = kwargs.get("attention_mask")
    q_len = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = adapter.format_positions(as_rows(adapter.decode_positions(session, mask, q_len)))
    if session.position_shift is not None:
        shift = session.position_shift.to(kwargs["position_ids"].device)
        kwargs["position_ids"] = kwargs["position_ids"] + shift.view(*([1] * (kwargs["position_ids"].dim() - 2)), -1, 1)
    if mask is not None:
        new_cols = mask[:, session.original_prompt_len:].to(session.compact_mask)
    else:
        new_cols = torch.ones(session.compact_mask.shape[0], session.original_seen - session.original_prompt_len
                              + q_len, dtype=session.compact_mask.dtype, device=session.compact_mask.device)
    kwargs["attention_mask"] = torch.cat([session.compact_mask, new_cols], dim=1)
    session.original_seen += q_len
    return forward(**kwargs)
