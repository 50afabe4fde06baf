"""Issue 21: the Python work of a pruned prefill does not grow with the number of visual tokens.

The pipeline (``vtprune/pipeline``) and the model adapters (``vtprune/models``) loop over samples, images,
crops, stages and layers, never over tokens: the number of Python lines they execute for one pruned
prefill is the same for an image of 4× the tokens. (The methods' own code is checked line by line in
``test_no_host_sync.py``; the greedy methods loop once per *kept* token, which is fixed here.)
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune.bench.latency import synthetic_inputs
from vtprune.tiny import tiny_model

SRC = Path(vtprune.__file__).resolve().parent
WATCHED = (str(SRC / "pipeline"), str(SRC / "models"))


def lines_executed(call) -> tuple[int, object]:
    """Line events in the watched files while ``call()`` runs, and what it returned."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename.startswith(WATCHED) else None

    sys.settrace(tracer)
    try:
        out = call()
    finally:
        sys.settrace(None)
    return count, out


def pruned_prefill_lines(family: str, image_size: tuple[int, int], method: str, **kw) -> tuple[int, int]:
    """(lines executed by one pruned prefill, visual tokens entering the LLM) at ``image_size``."""
    model = tiny_model(family).float().eval()
    inputs = synthetic_inputs(model, batch_size=1, image_size=image_size, prompt_tokens=8, seed=0,
                              device=torch.device("cpu"))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with vtprune.pruned(model, method, **kw) as handle:
            model(**inputs, use_cache=True)  # first call: caches per image size, lazy imports
            lines, _ = lines_executed(lambda: model(**inputs, use_cache=True))
            return lines, handle.last.images[0].candidates


#: family: a small and a large image, and how many times more candidates the large one has at least.
#: LLaVA-NeXT and OneVision: both images have a base view and 2×2 crops (the loop over crops runs as
#: often); they unpad to different numbers of patch rows and newline tokens.
SIZES = {"qwen2_5_vl": ((112, 112), (224, 224), 3.0), "qwen3_vl": ((112, 112), (224, 224), 3.0),
         "llava_next": ((30, 56), (56, 56), 1.6), "llava_onevision": ((56, 30), (30, 56), 2.0)}
METHODS = [("random", {"keep": 4}), ("keep_all", {"stage": "vision"}), ("fastv", {"keep": 4, "layer": 2}),
           ("keep_all", {"stage": "llm", "layer": 2})]


@pytest.mark.parametrize("family", sorted(SIZES))
@pytest.mark.parametrize("method,kw", METHODS, ids=[f"{m}-{next(iter(k.values()))}" for m, k in METHODS])
def test_pipeline_lines_do_not_grow_with_visual_tokens(family, method, kw):
    small, large, ratio = SIZES[family]
    lines_small, tokens_small = pruned_prefill_lines(family, small, method, **kw)
    lines_large, tokens_large = pruned_prefill_lines(family, large, method, **kw)
    assert tokens_large >= ratio * tokens_small  # the premise: more tokens
    assert lines_large == lines_small, (lines_small, lines_large)
