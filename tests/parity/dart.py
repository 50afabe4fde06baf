"""Parity runner for ``dart`` (fixture: tests/fixtures/parity/dart.json). The final norm is a
transformers ``LlamaRMSNorm`` with a seeded, non-uniform weight (the case's ``norm_weight_seed``)."""
from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from vtprune.methods.dart import DART

from .llm_runner import context, sample


def final_norm(dim: int, seed: int) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=torch.Generator().manual_seed(seed)) * 2 + 0.05)
    return norm


def run(case: dict) -> dict:
    s = sample(case)
    norm = final_norm(s["hidden"].shape[1], case["norm_weight_seed"])
    with torch.no_grad():
        selection = DART(**case["args"]).select_llm(context(s, {"final_norm": norm}))
    return {"keep": selection.keep.sort().values, "count": selection.keep.numel()}
