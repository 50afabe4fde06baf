"""Parity runner for ``pyramiddrop`` (fixture: tests/fixtures/parity/pyramiddrop.json).

The ranking attention comes from the pipeline's own provider (``pipeline.llm_stage.attention_entering``)
run on a transformers ``LlamaDecoderLayer`` with seeded weights (``layer_weights``), as the official code's
``self.layers[rank_layer]``."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from vtprune.methods.pyramiddrop import PyramidDrop
from vtprune.pipeline.llm_stage import attention_entering

from .llm_runner import context, sample

HEADS, EPS = 8, 1e-6


def layer_weights(dim: int, seed: int) -> dict[str, torch.Tensor]:
    """The rank layer's input-norm weight and q/k/v projections (out, in), seeded."""
    g = torch.Generator().manual_seed(5_000 + seed)
    return {"norm": torch.rand(dim, generator=g) * 2 + 0.05,
            **{name: torch.randn(dim, dim, generator=g) / math.sqrt(dim) for name in ("q", "k", "v")}}


def decoder_layer(dim: int, seed: int, layer_idx: int) -> tuple[LlamaDecoderLayer, LlamaConfig]:
    config = LlamaConfig(hidden_size=dim, intermediate_size=2 * dim, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, rms_norm_eps=EPS, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, layer_idx)
    w = layer_weights(dim, seed)
    with torch.no_grad():
        layer.input_layernorm.weight.copy_(w["norm"])
        for name in ("q", "k", "v"):
            getattr(layer.self_attn, f"{name}_proj").weight.copy_(w[name])
    return layer, config


def run(case: dict) -> dict:
    s = sample(case)
    hidden = s["hidden"][None]
    K = case["rank_layer"]
    layer, config = decoder_layer(hidden.shape[-1], case["weights_seed"], K)
    positions = torch.arange(hidden.shape[1])[None]
    with torch.no_grad():
        cos_sin = LlamaRotaryEmbedding(config)(hidden, positions)
    adapter = SimpleNamespace(decoder_layers={K: layer})
    call = attention_entering(adapter, K, hidden, {"position_embeddings": cos_sin, "attention_mask": None})
    providers = {"layer_attention": lambda rows: call.rows(0, torch.as_tensor(rows))}
    selection = PyramidDrop(**case["args"]).select_llm(context(s, providers, layer=K))
    return {"keep": selection.keep.sort().values, "count": selection.keep.numel()}
