"""Parity runner for SparseVLM: three pruning stages of a toy decoder on seeded inputs.

The toy decoder (shared with the scratch script that ran the official code) is deterministic:

* the sequence is ``PREFIX`` text tokens, the image's projected patches, then the remaining text
  (``inputs.make``'s ``text`` rows split at ``PREFIX``); these are the LLM's input embeddings;
* decoder layer ``l`` maps its input ``x`` to ``x + 0.1 tanh(x + l)`` (a contraction-like map, so that
  rounding differences do not grow from layer to layer);
* its attention is the causal softmax of ``x xᵀ / √d`` per head (``HEADS`` heads of ``x``'s columns),
  positions contiguous (the official schedule renumbers them after each stage).

The official code prunes the output of layers 2, 6 and 15 with those layers' attention; vtprune runs
the same selection at the input of layers 3, 7 and 16 with the attention of the layer before. Each
stage's selection is applied the way the pipeline applies it (kept candidates, their values replaced)
and the next layer runs on the shortened sequence.
"""
from __future__ import annotations

import math

import torch

from vtprune.methods.base import LLMContext
from vtprune.methods.sparsevlm import SparseVLM

from . import inputs

HEADS = 4
PREFIX = 5
OFFICIAL_LAYERS = (2, 6, 15)  # layers whose output the official code prunes


def embeddings(case_inputs: dict) -> tuple[torch.Tensor, int]:
    """(L, D) input embeddings of the toy sequence and its number of visual tokens."""
    x = inputs.make(**case_inputs)
    return torch.cat([x["text"][:PREFIX], x["projected"], x["text"][PREFIX:]]), x["projected"].shape[0]


def layer_output(x: torch.Tensor, layer: int) -> torch.Tensor:
    return x + 0.1 * torch.tanh(x + layer)


def layer_attention(x: torch.Tensor) -> torch.Tensor:
    """(H, L, L) causal attention probabilities of the toy layer whose input is ``x``."""
    n, d = x.shape
    heads = x.view(n, HEADS, d // HEADS).transpose(0, 1)
    logits = heads @ heads.transpose(1, 2) / math.sqrt(d // HEADS)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, -float("inf")), dim=-1)


def run(case: dict) -> dict:
    embeds, n = embeddings(case["inputs"])
    method = SparseVLM(**case["args"])
    assert tuple(method.llm_layers) == tuple(l + 1 for l in OFFICIAL_LAYERS)
    first_visual, first_text = torch.arange(PREFIX, PREFIX + n), torch.arange(PREFIX + n, embeds.shape[0])
    x, visual, out = embeds, first_visual, {}
    for layer in range(OFFICIAL_LAYERS[-1] + 1):
        hidden = layer_output(x, layer)
        if layer + 1 in method.llm_layers:
            stage = method.llm_layers.index(layer + 1)
            attention = layer_attention(x)
            text = torch.arange(PREFIX + len(visual), hidden.shape[0])
            ctx = LLMContext(hidden=hidden, visual=visual, text_after=text, layer=layer + 1, stage_index=stage,
                             family="llava", original_visual=n,
                             providers={"attention": lambda rows, a=attention: a[:, torch.as_tensor(rows)],
                                        "input_embeddings": lambda: (embeds[first_visual], embeds[first_text])})
            if stage == 0:
                out["raters"] = torch.nonzero(method.raters(ctx)).flatten().tolist()
            sel = method.select_llm(ctx)
            block = hidden[visual[sel.keep]]
            if sel.values is not None:
                block = sel.values
            by_score = sel.info["by_score"]
            out[f"keep{stage}"] = by_score.tolist()
            out[f"count{stage}"] = block.shape[0]
            out[f"merged{stage}"] = block[len(by_score):]
            out[f"norms{stage}"] = block.norm(dim=1)  # the order of the visual block
            hidden = torch.cat([hidden[:PREFIX], block, hidden[PREFIX + len(visual):]])
            visual = torch.arange(PREFIX, PREFIX + block.shape[0])
        x = hidden
    return out
