"""Position ids of the compact sequence: gathered at the kept slots (original positions), numbered
without gaps (``positions="contiguous"``), or for image spans rewritten to another token count."""
from __future__ import annotations

import torch


def as_rows(positions: torch.Tensor) -> torch.Tensor:
    """(B, L) → (1, B, L); (P, B, L) unchanged."""
    return positions.unsqueeze(0) if positions.dim() == 2 else positions


def as_rows_or_none(positions):
    return None if positions is None else as_rows(positions)


def gathered_positions(kwargs, gather, padded: bool = True) -> dict:
    """The current position embeddings and ids at the slots ``gather`` keeps (original positions;
    ``padded`` False: no slot is padding, -1)."""
    cos, sin = kwargs["position_embeddings"]
    idx = (gather.clamp(min=0) if padded else gather).to(cos.device)
    out = {"position_embeddings": (take(cos, idx), take(sin, idx))}
    pos = kwargs.get("position_ids")
    if pos is not None:
        out["position_ids"] = pos.expand(idx.shape[0], -1).gather(1, idx.to(pos.device)) if pos.dim() == 2 else pos
    return out


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The sequence slots ``idx`` (B, L') of ``t``, whose sequence is the second-to-last dim: (B, L, d)
    or (3, B, L, d)."""
    if idx.shape[0] == 1:
        return t.index_select(t.dim() - 2, idx[0])
    view = idx.view(*([1] * (t.dim() - 3)), *idx.shape, 1).expand(*t.shape[:-2], idx.shape[1], t.shape[-1])
    return t.gather(t.dim() - 2, view)


def contiguous_positions(mask: torch.Tensor, caller_positions: bool) -> torch.Tensor:
    """(B, L) positions without gaps for a left-padded sequence with ``mask``, numbered as the
    unmodified model numbers its input: from each sample's first real token when the caller passes
    positions (``generate``), else by column."""
    if caller_positions:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)


def contiguous_shift(final_mask: torch.Tensor, input_mask: torch.Tensor, caller_positions: bool) -> torch.Tensor:
    """(B,) what carries the caller's decoding positions (which count the unpruned prompt) onto the
    contiguous numbering of the pruned one."""
    if caller_positions:
        return (final_mask.sum(1).to(input_mask.device) - input_mask.sum(1)).long()
    return torch.full((final_mask.shape[0],), final_mask.shape[1] - input_mask.shape[1], dtype=torch.long)


def rewritten_positions(mask, full_mask, length: int, full_length: int, caller_positions: bool):
    """1-D positions of a sequence whose image spans were rewritten (another token count), and the
    per-sample shift that carries the caller's decoding positions onto them. A caller that passes
    positions (``generate``) numbers each sample from its first real token, and so do we; otherwise
    the model numbers columns (padding included), and so do we."""
    if caller_positions:
        positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions, (full_mask.sum(1) - mask.sum(1)).long()
    positions = torch.arange(full_length, device=full_mask.device).expand(full_mask.shape[0], -1)
    return positions, torch.full((full_mask.shape[0],), full_length - length, dtype=torch.long)
