"""Seeded inputs shared by the parity fixtures and the scratch scripts that produced them.

A fixture names its inputs (``kind``, ``seed`` and shapes); ``make(**case["inputs"])`` rebuilds them
bit for bit on CPU, and ``checksum`` guards against a generator that drifted. Two kinds:

- ``random``: i.i.d. Gaussian features;
- ``structured``: like CLIP features, smooth segments of the patch grid (one vector per segment plus
  a little noise) with a few high-norm outlier tokens.

The attention is computed from seeded query/key projections of the features, as a vision block
would, so that CLS attention, received attention and keys agree with each other.
"""
from __future__ import annotations

import math

import torch

KINDS = ("random", "structured")


def make(kind: str = "random", seed: int = 0, n: int = 576, dim: int = 1024, heads: int = 16,
         llm_dim: int = 4096, text: int = 24, outliers: int = 4, segments: int = 12) -> dict[str, torch.Tensor]:
    """Inputs of one image (one crop) with ``n`` patches on a square grid, CLS first.

    features   (n+1, dim)            the feature layer's tokens, CLS at row 0 (before the projector)
    queries    (heads, n+1, dim/heads) and keys (heads, n+1, dim/heads) of the feature layer
    attention  (heads, n+1, n+1)     softmax(q k^T / sqrt(d_head)), fp32
    projected  (n, llm_dim)          the patches after a GELU projector (CLS dropped)
    text       (text, llm_dim)       LLM input embeddings of the instruction
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    side = math.isqrt(n)
    if kind == "random":
        features = torch.randn(n + 1, dim, generator=g)
    else:
        features = _structured(g, n, side, dim, outliers, segments)
    head_dim = dim // heads
    w_q = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    w_k = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    queries = (features @ w_q).view(n + 1, heads, head_dim).transpose(0, 1)
    keys = (features @ w_k).view(n + 1, heads, head_dim).transpose(0, 1)
    attention = torch.softmax(queries @ keys.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
    w_1 = torch.randn(dim, llm_dim, generator=g) / math.sqrt(dim)
    w_2 = torch.randn(llm_dim, llm_dim, generator=g) / math.sqrt(llm_dim)
    projected = torch.nn.functional.gelu(features[1:] @ w_1) @ w_2
    text_embeds = torch.randn(text, llm_dim, generator=g) * 0.02
    return {"features": features, "queries": queries, "keys": keys, "attention": attention,
            "projected": projected, "text": text_embeds}


def _structured(g: torch.Generator, n: int, side: int, dim: int, outliers: int, segments: int) -> torch.Tensor:
    centres = torch.rand(segments, 2, generator=g) * side
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], dim=1).float()[:n]
    segment = torch.cdist(cells, centres).argmin(dim=1)  # Voronoi regions of the grid
    means = torch.randn(segments, dim, generator=g)
    patches = means[segment] + 0.1 * torch.randn(n, dim, generator=g)
    spikes = torch.randperm(n, generator=g)[:outliers]
    patches[spikes] = patches[spikes] * 20.0
    cls = patches.mean(dim=0, keepdim=True) + 0.1 * torch.randn(1, dim, generator=g)
    return torch.cat([cls, patches])


def checksum(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the float64 sum of |x|: fixtures store it to catch a generator that changed."""
    return {name: float(t.double().abs().sum()) for name, t in sorted(tensors.items())}
