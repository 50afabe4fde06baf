"""An LLM-stage sample built from ``inputs.make``: the prompt as a LLaVA decoder sees it.

``sequence(kind, seed, ...)`` lays out ``prefix`` system-prompt tokens, the image's ``n`` projected
patches and the ``text`` instruction tokens (the text after the image), and derives from seeded
per-head query/key projections what a decoder layer would hold there: the causal attention
probabilities and the keys. Used by the LLM-stage parity runners (FastV, PyramidDrop, DART) and by
the scratch scripts that ran the official code, so that both see the same tensors.
"""
from __future__ import annotations

import math

import torch

from .inputs import make


def sequence(kind: str = "random", seed: int = 0, n: int = 576, prefix: int = 35, text: int = 24,
             llm_dim: int = 256, heads: int = 8, dim: int = 1024) -> dict[str, torch.Tensor]:
    """hidden (L, llm_dim), attention (heads, L, L) causal fp32, keys (heads, L, llm_dim/heads),
    image_start (= prefix), image_length (= n); L = prefix + n + text."""
    m = make(kind, seed, n=n, dim=dim, llm_dim=llm_dim, text=text)
    g = torch.Generator().manual_seed(1_000_003 + seed)
    system = torch.randn(prefix, llm_dim, generator=g)
    visual = m["projected"] / m["projected"].std()
    instruction = m["text"] / 0.02
    hidden = torch.cat([system, visual, instruction])
    head_dim = llm_dim // heads
    w_q = torch.randn(llm_dim, llm_dim, generator=g) / math.sqrt(llm_dim)
    w_k = torch.randn(llm_dim, llm_dim, generator=g) / math.sqrt(llm_dim)
    length = hidden.shape[0]
    queries = (hidden @ w_q).view(length, heads, head_dim).transpose(0, 1)
    keys = (hidden @ w_k).view(length, heads, head_dim).transpose(0, 1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = (queries @ keys.transpose(1, 2) / math.sqrt(head_dim)).masked_fill(~causal, float("-inf"))
    return {"hidden": hidden, "attention": torch.softmax(scores, dim=-1), "keys": keys,
            "image_start": torch.tensor(prefix), "image_length": torch.tensor(n)}
