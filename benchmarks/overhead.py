#!/usr/bin/env python3
"""Pipeline overhead on CPU: a pruned prefill against the unmodified model at the pruned length.

    python benchmarks/overhead.py --out benchmarks/results/DATE_cpu_overhead   # tiny models, 4 families, ~4 min
    python benchmarks/overhead.py --preset llava-1.5-7b --num-layers 2 --repeats 20 --warmup 2 \
        --check-repeats 3 --methods keep_all:vision,random,cls_topk,divprune,fastv,occamtoken --out ...
    python benchmarks/overhead.py --summarize RESULT.json ...   # the method × model matrix of results
    python benchmarks/overhead.py --render RESULT.json ...      # rewrite RESULT.md from RESULT.json

What is compared, per method and model, in interleaved rounds: each round runs one (a, b) pair of
every configuration of the model (a first in even rounds, b first in odd ones; configurations in an
order rotated every round), so that background load on a shared machine hits a and b alike and
every configuration's rounds spread over the whole run; ``--warmup`` rounds are discarded.

(b) the pruned call: ``pruned(**inputs, use_cache=True, logits_to_keep=1)`` (a prefill, as
    ``generate`` makes it), where ``pruned`` is a *twin* of the model — a second module tree sharing
    the same parameter and buffer tensors (no copy of the weights; ``make_twin``) — with
    ``vtprune.apply(pruned, method)`` in force for the whole run, as in real use (whatever the
    pipeline caches across calls keeps working; ``handle.reset_stats()`` between calls, untimed).
    Each configuration has its own twin.

(a) the reference: what the pruned call ends up computing, done by the unmodified model (the
    original module tree, which vtprune never touches) with nothing else. It is built from one pruned
    call run first with observing hooks (the *capture*):

    * the vision side: the unmodified modules on the same pixels. LLaVA / LLaVA-NeXT: the CLIP tower
      (``output_hidden_states=True``, as ``get_image_features`` runs it) on all crops, then the
      projector on exactly the tensor(s) the pruned call fed the projector (captured by a pre-hook on
      ``multi_modal_projector``; vision-stage methods project only the kept patches, LLaVA-NeXT only
      the patches its unpadded layout shows). Qwen2.5-VL / Qwen3-VL: ``model.model.get_image_features``
      (tower with its merger, and Qwen3-VL's DeepStack features), which the pruned call also runs on
      every patch. Its output is not consumed: it is the same compute, timed.
    * the language side: a pre-hook on ``model.model`` captures what the pipeline handed the model's
      own forward: the compact ``input_ids`` (text + kept visual tokens at their original positions),
      ``attention_mask``, ``position_ids`` and the pruned image features (``mm_encoder_outputs``).
      - pre-LLM methods (vision / projected stage): the unmodified top-level forward on them,
        ``model(input_ids=..., attention_mask=..., position_ids=..., mm_encoder_outputs=...,
        use_cache=True, logits_to_keep=1)``: embedding, scatter of the image features, the decoder
        (DeepStack included), norm and lm_head on the last token — the model at the pruned length;
      - in-LLM methods (and ``keep_all`` at the llm stage): the same top-level forward, in which the
        language model's ``forward`` is replaced (for that call only) by a written-out copy of the
        decoder's own prefill (``create_causal_mask``, rotary embedding, the decoder layers with a
        ``DynamicCache``, DeepStack, norm) that, at each pruning layer K, drops the pruned rows of the
        hidden states with one index (rows whose values a merging method replaced are overwritten with
        the captured values) and rebuilds the mask, the rotary embedding and the DeepStack rows for
        the kept tokens — what a FastV-style modified forward does, with no hook. Which rows were kept
        is read in the capture from the hidden states entering layer K just before and just after the
        pipeline's own pre-hook (exact row matching; a replaced row is placed by its rotary row);
        nothing of vtprune's internals is read. The KV cache of the layers before K keeps the dropped
        tokens: compacting it (which the pipeline does, for decoding) counts as overhead.

    The capture also runs the reference once with all logits (``logits_to_keep=0``) and compares them
    with the pruned call's logits: ``max_abs_logit_diff`` must stay within 1e-4 (the test checks it),
    else (a) would not be what (b) computes. A second check per model (``loop_check``) times the
    written-out decoder without any drop against the model's own forward on the same inputs: a
    reference faster than the model's own code would overstate the in-LLM overheads by the difference
    (it is within ±0.1 ms on the tiny models).

What (b) must do and (a) does not is all counted as overhead, including work the unmodified model
would also do on a full-length call: the Qwen M-RoPE position ids of the full sequence
(``get_rope_index``), LLaVA-NeXT's unpadded layout with newline tokens (the model's
``pack_image_features``). ``unavoidable`` in the JSON gives the time of those two on the full input,
for reference. The attention maps a method reads (vision tower, decoder layer K−1) are recorded
during (b) and computed lazily inside the method: the latter counts as method time.

Reported per method: median(b) − median(a) ("overhead", ms) with a 95 % paired bootstrap interval
(rounds resampled), the method's own time (``handle.last.method_seconds``, median), and
median(b − method time) − median(a) ("pipeline", ms: the overhead without the method's own selection
code — the vtprune glue: laying out the compact sequence, hooks, attention recording, KV-cache
compaction). Targets (issue 21): pipeline overhead ≤ 1 ms for pre-LLM methods, ≤ 2 ms for in-LLM ones;
the verdict reads the interval: "meets" when all of it is at or below the target, "misses by X" when
all of it is above (X = point estimate − target), "unresolved" when it spans the target (or when there
are fewer than 5 rounds). The JSON keeps
every round's raw times, the load average before and after each model, and the exact command.

Models: ``vtprune.tiny`` (all four families; default) or ``--preset NAME --num-layers N``: the preset's
architecture at its real widths with the decoder and the vision tower cut to N layers (random
weights, fp32; N ≥ 2 so that an in-LLM method has a layer to prune at; layers of methods that do not
fit are moved into the decoder, see ``method_plan``). One thread (``--threads``) by default.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import inspect
import json
import math
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vtprune.bench.latency import gc_paused

TARGET_MS = {"pre-LLM": 1.0, "in-LLM": 2.0}
LOGIT_TOLERANCE = 1e-4
MIN_ROUNDS = 5  # fewer rounds give no usable interval: the verdict is "unresolved"


# --------------------------------------------------------------------------------------------------
# what runs


@dataclass
class Config:
    """One row: a method instance's recipe and how to apply it."""

    label: str  # e.g. "fastv", "keep_all(llm)"
    name: str
    kwargs: dict
    layout: str | None = None  # LLaVA-NeXT layout passed to apply (None: the method's default)


def budget_methods() -> list[str]:
    """Every registered method whose constructor takes ``keep=`` (sorted)."""
    from vtprune.methods import available_methods, method_class

    return [n for n in available_methods() if not n.startswith("test_")
            and "keep" in inspect.signature(method_class(n).__init__).parameters]


def _fit_layers(default: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """``default`` when every layer fits the decoder (1..N-1); else up to three layers spread over it."""
    if all(1 <= l < num_layers for l in default):
        return tuple(default)
    spread = sorted({min(num_layers - 1, max(1, round(num_layers * f))) for f in (0.25, 0.5, 0.75)})
    return tuple(spread[: len(default)]) if len(default) < len(spread) else tuple(spread)


def method_plan(family: str, num_layers: int, keep: int, methods: list[str] | None = None,
                tiny: bool = True) -> list[Config]:
    """The configurations to time: ``keep_all`` at the vision and llm stages, then every method that
    takes ``keep=`` with ``keep`` and its defaults, except where a default does not fit this model
    (decoder layers beyond a shallow decoder; OCVTP's shipped checkpoint for the tiny 32-wide towers).
    ``methods`` picks entries by label or name (``keep_all:vision`` / ``keep_all(vision)`` / ``fastv``)."""
    from vtprune.methods import method_class

    llm_layer = min(2, num_layers - 1)
    plan = [Config("keep_all(vision)", "keep_all", {"stage": "vision"}),
            Config("keep_all(llm)", "keep_all", {"stage": "llm", "layer": llm_layer})]
    for name in budget_methods():
        cls = method_class(name)
        params = inspect.signature(cls.__init__).parameters
        kwargs: dict[str, Any] = {"keep": keep}
        if "layers" in params:  # pyramiddrop, sparsevlm
            kwargs["layers"] = _fit_layers(params["layers"].default, num_layers)
        elif "layer" in params and isinstance(params["layer"].default, int) and params["layer"].default >= num_layers:
            kwargs["layer"] = num_layers - 1  # fastv, dart (occamtoken picks its own within the decoder)
        if name == "ocvtp":
            from vtprune.ocvtp import checkpoint_dir

            kwargs["checkpoint"] = checkpoint_dir() / "synthetic-d32" if tiny else None
        if name == "sparsevlm":  # merged tokens in their centres' rows: the reference matches rows in order
            kwargs["merged_position"] = "centre"
        layout = "flat" if family in ANYRES and getattr(cls, "needs_full_grid", False) else None
        plan.append(Config(name, name, kwargs, layout))
    if methods:
        wanted = {m.replace(":", "(") + (")" if ":" in m else "") for m in methods}
        unknown = wanted - {c.label for c in plan} - {c.name for c in plan}
        if unknown:
            raise SystemExit(f"unknown method(s) {', '.join(sorted(unknown))}; choose from "
                             f"{', '.join(c.label for c in plan)}")
        plan = [c for c in plan if c.label in wanted or (c.name in wanted and c.name != "keep_all")]
    return plan


# --------------------------------------------------------------------------------------------------
# models and inputs


def build_tiny(family: str, seed: int = 0):
    from vtprune.tiny import tiny_model

    return tiny_model(family, seed=seed).float().eval()


def build_preset(preset: str, num_layers: int, seed: int = 0):
    """The preset's architecture (real widths), decoder and vision tower cut to ``num_layers``, random
    weights, fp32, on the CPU."""
    import transformers

    from vtprune.bench.latency import hf_class_name
    from vtprune.presets import load_config

    if num_layers < 2:
        raise SystemExit("--num-layers must be at least 2 (an in-LLM method prunes at a layer in 1..N-1)")
    cfg = load_config(preset)
    tc, vc = cfg.get_text_config(), cfg.vision_config
    tc.num_hidden_layers = num_layers
    if getattr(tc, "layer_types", None) is not None:
        tc.layer_types = list(tc.layer_types)[:num_layers]
    if getattr(tc, "max_window_layers", None) is not None:
        tc.max_window_layers = min(tc.max_window_layers, num_layers)
    if hasattr(vc, "depth"):  # Qwen towers
        vc.depth = num_layers
        if getattr(vc, "fullatt_block_indexes", None) is not None:
            vc.fullatt_block_indexes = [num_layers - 1]
        if getattr(vc, "deepstack_visual_indexes", None) is not None:
            vc.deepstack_visual_indexes = list(range(min(len(vc.deepstack_visual_indexes), num_layers)))
    else:
        vc.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    cls = getattr(transformers, hf_class_name(cfg.model_type))
    model = cls._from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def make_inputs(model, tiny: bool, prompt_tokens: int = 32, image_size: tuple[int, int] | None = None,
                seed: int = 0) -> dict:
    """Processor-shaped synthetic inputs (one image, BOS, placeholders, ``prompt_tokens`` text ids), as
    ``vtprune bench`` builds them: tiny sizes from the family's ``tiny.image_size``, else 672×672 (LLaVA-1.5: 336)."""
    from vtprune.bench.latency import resolve_image_size, synthetic_inputs
    from vtprune.models import family_of

    family = family_of(model)
    size = resolve_image_size(model, family, image_size, tiny=tiny)
    return synthetic_inputs(model, batch_size=1, image_size=size, prompt_tokens=prompt_tokens, seed=seed,
                            device=torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# the capture and the reference


def _row_keys(x: torch.Tensor) -> list[bytes]:
    """Exact bytes of each row of a (L, D) tensor."""
    arr = x.detach().cpu().contiguous().view(torch.uint8).numpy()
    return [arr[i].tobytes() for i in range(arr.shape[0])]


def _match_rows(before_h, after_h, before_cos, after_cos) -> tuple[torch.Tensor, list[int]]:
    """Indices into ``before`` of the rows of ``after`` (order preserved): exact hidden-state rows
    first; a row with no exact match (values replaced by a merging method) is placed by its rotary
    row. Returns (index, rows of ``after`` whose values were replaced)."""
    bh, ah = _row_keys(before_h), _row_keys(after_h)
    bc, ac = _row_keys(before_cos), _row_keys(after_cos)
    idx, replaced, i = [], [], 0
    for j in range(len(ah)):
        k = i
        while k < len(bh) and bh[k] != ah[j]:
            k += 1
        if k == len(bh):  # replaced values: place by position
            k = i
            while k < len(bc) and bc[k] != ac[j]:
                k += 1
            if k == len(bc):
                raise RuntimeError(f"row {j} after pruning matches no row before it (hidden state or position)")
            replaced.append(j)
        idx.append(k)
        i = k + 1
    return torch.tensor(idx, dtype=torch.long), replaced


def _cos(pe) -> torch.Tensor:
    """(L, D') rotary cosine rows of sample 0, one per token: (B, L, d) or M-RoPE's (3, B, L, d)."""
    cos = pe[0][..., 0, :, :]
    return cos.movedim(-2, 0).reshape(cos.shape[-2], -1)


@dataclass
class Capture:
    """What one pruned call computed, enough to redo it with the unmodified model."""

    family: str
    pixels: dict  # vision inputs for the reference's vision side
    projector_inputs: list  # LLaVA families: the tensors the pipeline projected
    lm_kwargs: dict  # input_ids, attention_mask, position_ids, mm_encoder_outputs of the compact call
    stages: dict  # in-LLM: {layer: (row index, replaced rows, replacement values)}
    pruned_logits: torch.Tensor
    method_seconds: float
    tokens: dict = field(default_factory=dict)


QWEN = ("qwen2_5_vl", "qwen3_vl")
ANYRES = ("llava_next", "llava_onevision")  # AnyRes crops, image_sizes, newline tokens
LLAVA_LIKE = ("llava",) + ANYRES  # 1-D positions, a multi_modal_projector on tower features


def _vision_pixels(model, family: str, inputs: dict) -> dict:
    if family in QWEN:
        return {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    pv = inputs["pixel_values"]
    if family in ANYRES:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crops = [image_size_to_num_patches(tuple(s), model.config.image_grid_pinpoints,
                                           model.config.vision_config.image_size)
                 for s in inputs["image_sizes"].tolist()]
        pv = torch.cat([pv[i, :c] for i, c in enumerate(crops)])
    return {"pixel_values": pv}


def capture(model, handle, inputs: dict) -> Capture:
    """Run the pruned call once (``handle``: the ``vtprune.apply`` in force on ``model``) with
    observing hooks, removed afterwards; returns what the reference needs."""
    from vtprune.methods import Stage
    from vtprune.models import family_of

    family = family_of(model)
    inner = model.model
    lm = inner.language_model
    seen: dict[str, Any] = {"proj": [], "before": {}, "after": {}}
    handles = []

    def on_inner(module, args, kwargs):  # LLaVA-NeXT passes input_ids by position
        seen["inner"] = dict(kwargs, **dict(zip(("input_ids",), args)))

    def on_proj(module, args, kwargs):
        seen["proj"].append(args[0] if args else kwargs["hidden_states"])

    method = handle.method
    try:
        handles.append(inner.register_forward_pre_hook(on_inner, with_kwargs=True))
        if family in LLAVA_LIKE:
            handles.append(inner.multi_modal_projector.register_forward_pre_hook(on_proj, with_kwargs=True))
        llm_layers = tuple(method.llm_layers) if Stage.LLM in method.stages else ()
        for K in llm_layers:
            layer = lm.layers[K]

            def before(module, args, kwargs, K=K):
                h = args[0] if args else kwargs["hidden_states"]
                seen["before"][K] = (h.detach().clone(), _cos(kwargs["position_embeddings"]).clone())

            def after(module, args, kwargs, K=K):
                h = args[0] if args else kwargs["hidden_states"]
                seen["after"][K] = (h.detach().clone(), _cos(kwargs["position_embeddings"]).clone())

            handles.append(layer.register_forward_pre_hook(before, with_kwargs=True, prepend=True))
            handles.append(layer.register_forward_pre_hook(after, with_kwargs=True))
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=0)
        stats = handle.last
    finally:
        for h in handles:
            h.remove()
    kw = seen["inner"]
    lm_kwargs = {k: kw[k] for k in ("input_ids", "attention_mask", "position_ids", "mm_encoder_outputs")}
    stages = {}
    if llm_layers:
        # rotary rows entering the first pruning layer are the model's own (its kwargs); a later stage's
        # are those the previous stage set (the kwargs a prepended hook sees there are stale)
        cos_prev = seen["before"][llm_layers[0]][1]
        for K in llm_layers:
            after_h, after_cos = seen["after"][K]
            idx, replaced = _match_rows(seen["before"][K][0][0], after_h[0], cos_prev, after_cos)
            values = after_h[0, replaced].clone() if replaced else None
            stages[K] = (idx, torch.tensor(replaced, dtype=torch.long), values)
            cos_prev = after_cos
    tokens = {"sequence_in": int(inputs["input_ids"].shape[1]),
              "entering_llm": int(lm_kwargs["input_ids"].shape[1]),
              "after_llm_stages": int(out.logits.shape[1]),
              "visual_entering": stats.tokens_entering_llm[0], "visual_final": len(stats.kept_columns[0])}
    return Capture(family=family, pixels=_vision_pixels(model, family, inputs), projector_inputs=seen["proj"],
                   lm_kwargs=lm_kwargs, stages=stages, pruned_logits=out.logits.detach(),
                   method_seconds=stats.method_seconds, tokens=tokens)


def _positions(family: str, position_ids):
    """(rotary position ids, position ids the decoder layers and the mask get) as the model's forward
    derives them."""
    if family in LLAVA_LIKE:
        return position_ids, position_ids
    if position_ids.dim() == 2:
        position_ids = position_ids[None].expand(3, -1, -1)
    if position_ids.shape[0] == 4:
        return position_ids[1:], position_ids[0]
    return position_ids, None


def reference_vision(model, cap: Capture):
    """The unmodified model's vision side on the same pixels (output discarded: the timed compute)."""
    inner = model.model
    if cap.family in QWEN:
        return inner.get_image_features(cap.pixels["pixel_values"], cap.pixels["image_grid_thw"])
    tower = inner.vision_tower(cap.pixels["pixel_values"], output_hidden_states=True, return_dict=True)
    return tower, [inner.multi_modal_projector(x) for x in cap.projector_inputs]


def reference_llm(model, cap: Capture, logits_to_keep: int = 1):
    """Logits of the unmodified model at the pruned length (see the module docstring)."""
    if not cap.stages:
        return model(**cap.lm_kwargs, use_cache=True, logits_to_keep=logits_to_keep).logits
    with dropping_body(model, cap.family, cap.stages):
        return model(**cap.lm_kwargs, use_cache=True, logits_to_keep=logits_to_keep).logits


@contextlib.contextmanager
def dropping_body(model, family: str, stages: dict):
    """While in force, the language model's forward is :func:`language_model_body` (set on the
    instance, removed on exit): the model's own top-level forward runs around it unchanged."""
    import functools

    lm = model.model.language_model
    lm.forward = functools.partial(language_model_body, lm, _body_names(type(lm)), family, stages)
    try:
        yield
    finally:
        del lm.forward


@functools.lru_cache(maxsize=None)
def _body_names(lm_class) -> dict:
    """Resolved once per decoder class: the functions the body calls and what each calls the cache
    (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.modeling_outputs import BaseModelOutputWithPast

    layer_forward = None
    for name in dir(sys.modules[lm_class.__module__]):
        obj = getattr(sys.modules[lm_class.__module__], name)
        if isinstance(obj, type) and name.endswith("DecoderLayer"):
            layer_forward = obj.forward
    return {"DynamicCache": DynamicCache, "causal": create_causal_mask, "sliding": create_sliding_window_causal_mask,
            "Output": BaseModelOutputWithPast, "layer_cache": _cache_name(layer_forward),
            "mask_cache": _cache_name(create_causal_mask), "output_cache": _cache_name(BaseModelOutputWithPast)}


def _cache_name(fn) -> str:
    """``cache`` (transformers >= 5.24) or ``past_key_values``: what ``fn`` calls the KV cache."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def language_model_body(lm, names: dict, family: str, stages: dict, input_ids=None, attention_mask=None,
                        position_ids=None, inputs_embeds=None, use_cache=None, visual_pos_masks=None,
                        deepstack_visual_embeds=None, **kwargs):
    """The decoder's own prefill (Llama / Qwen2.5-VL text / Qwen3-VL text ``forward``) written out, with
    the rows of the hidden states dropped at each layer of ``stages`` ({layer: (row index, replaced
    rows, their values)}); mask, rotary embedding and DeepStack rows are rebuilt for the kept rows."""
    cfg = lm.config
    cache_kw = names["layer_cache"]
    cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
    h = inputs_embeds if inputs_embeds is not None else lm.embed_tokens(input_ids)
    if use_cache and cache is None:
        cache = names["DynamicCache"](config=cfg)
    rope_pos, layer_pos = _positions(family, position_ids)
    mask2d = attention_mask
    types = cfg.layer_types if family == "qwen2_5_vl" else None  # Qwen2.5-VL keys its masks by layer type

    def masks(h, mask2d, cache):
        args = {"config": cfg, "inputs_embeds": h, "attention_mask": mask2d, names["mask_cache"]: cache,
                "position_ids": layer_pos}
        if types is None:
            return names["causal"](**args)
        out = {"full_attention": names["causal"](**args)}
        if getattr(lm, "has_sliding_layers", False):
            out["sliding_attention"] = names["sliding"](**args)
        return out

    causal = masks(h, mask2d, cache)
    pe = lm.rotary_emb(h, rope_pos)
    deep, vis = deepstack_visual_embeds, visual_pos_masks
    for i, layer in enumerate(lm.layers):
        if i in stages:
            idx, replaced, values = stages[i]
            h = h[:, idx]
            if values is not None:
                h[:, replaced] = values
            rope_pos = rope_pos[..., idx]
            layer_pos = layer_pos[..., idx] if layer_pos is not None else None
            mask2d = mask2d[:, idx] if mask2d is not None else None
            if deep is not None and i < len(deep):
                rank = vis.long().cumsum(-1) - 1
                survivors = rank[:, idx][vis[:, idx]]
                deep = [d[survivors] for d in deep]
                vis = vis[:, idx]
            causal = masks(h, mask2d, None)  # the cache already holds the earlier layers' tokens
            pe = lm.rotary_emb(h, rope_pos)
        h = layer(h, attention_mask=causal[types[i]] if types is not None else causal, position_embeddings=pe,
                  position_ids=layer_pos, use_cache=use_cache, **{cache_kw: cache})
        if deep is not None and i < len(deep):
            h = lm._deepstack_process(h, vis, deep[i])
    h = lm.norm(h)
    return names["Output"](last_hidden_state=h, **{names["output_cache"]: cache})


# --------------------------------------------------------------------------------------------------
# statistics


def bootstrap_diff(b: list[float], a: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """median(b) − median(a) and its 95 % paired bootstrap interval (rounds resampled together)."""
    a_, b_ = np.asarray(a), np.asarray(b)
    point = float(np.median(b_) - np.median(a_))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a_), size=(n, len(a_)))
    diffs = np.median(b_[idx], axis=1) - np.median(a_[idx], axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return point, float(lo), float(hi)


# --------------------------------------------------------------------------------------------------
# the measurement


def _stage_kind(method) -> str:
    from vtprune.methods import Stage

    return "in-LLM" if Stage.LLM in method.stages else "pre-LLM"


def make_twin(model):
    """A second module tree of ``model`` that shares its parameters and buffers (no copy of the
    weights): a configuration's method is applied to it and stays in force for the whole run, while
    the reference runs on ``model`` itself, untouched by vtprune."""
    import copy
    import itertools

    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo).eval()


@dataclass
class Slot:
    """One configuration under measurement: its own twin with the method applied, the capture, the
    times of the rounds so far."""

    row: dict
    pruned: Any  # a twin of the model (shared weights) with the method applied
    handle: Any
    cap: Capture
    a: list = field(default_factory=list)
    b: list = field(default_factory=list)
    m: list = field(default_factory=list)


def prepare_config(model, inputs: dict, config: Config) -> Slot | dict:
    """Apply ``config`` to a fresh twin of ``model``, capture one pruned call and check that the
    reference (on ``model`` itself, which vtprune never touches) reproduces its logits. Returns the
    slot, or the row of a configuration that cannot run (unsupported method, bad budget)."""
    import vtprune
    from vtprune.errors import VTPruneError
    from vtprune.methods.base import make_method
    from vtprune.models import family_of

    family = family_of(model)
    row: dict[str, Any] = {"method": config.label, "name": config.name,
                           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.kwargs.items()}}
    options = {"layout": config.layout} if config.layout and family in ANYRES else {}
    # the reference finds each kept row by its rotary row, so every method runs with original positions
    # (renumbering them is one cumsum per call: the same bookkeeping cost)
    options["positions"] = "original"
    pruned = make_twin(model)
    try:
        method = make_method(config.name, **config.kwargs)
        handle = vtprune.apply(pruned, method, **options)
    except (VTPruneError, TypeError, ValueError) as e:
        return {**row, "status": "error", "error": f"{type(e).__name__}: {e}"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cap = capture(pruned, handle, inputs)
    except (VTPruneError, TypeError, ValueError) as e:
        handle.remove()
        return {**row, "status": "error", "error": f"{type(e).__name__}: {e}"}
    kind = _stage_kind(method)
    row.update(status="ok", kind=kind, describe=method.describe(),
               layout=(options.get("layout") or method.default_layout) if family in ANYRES else None,
               llm_layers=list(cap.stages), tokens=cap.tokens, target_ms=TARGET_MS[kind])
    with torch.no_grad():
        ref_logits = reference_llm(model, cap, logits_to_keep=0)
    row["max_abs_logit_diff"] = float((ref_logits - cap.pruned_logits).abs().max()) \
        if ref_logits.shape == cap.pruned_logits.shape else math.inf
    row["logit_scale"] = float(cap.pruned_logits.abs().max())
    return Slot(row=row, pruned=pruned, handle=handle, cap=cap)


def run_round(model, inputs: dict, slot: Slot, first: str) -> tuple[float, float, float]:
    """One round of a configuration: (a) the reference on ``model`` and (b) the pruned call on the
    slot's twin, in the order ``first`` ("a" or "b"). Returns (a seconds, b seconds, method seconds)."""

    def run_a():
        start = time.perf_counter()
        reference_vision(model, slot.cap)
        reference_llm(model, slot.cap, logits_to_keep=1)
        return time.perf_counter() - start

    def run_b():
        slot.handle.reset_stats()
        start = time.perf_counter()
        slot.pruned(**inputs, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start, slot.handle.last.method_seconds

    if first == "a":
        ta = run_a()
        tb, tm = run_b()
    else:
        tb, tm = run_b()
        ta = run_a()
    return ta, tb, tm


def finish_config(slot: Slot) -> dict:
    """The statistics of a slot's rounds; removes its method."""
    slot.handle.remove()
    a, b, m, row = slot.a, slot.b, slot.m, slot.row
    over, lo, hi = bootstrap_diff(b, a)
    pipe, plo, phi = bootstrap_diff([x - y for x, y in zip(b, m)], a)
    ref = statistics.median(a)
    row.update(
        reference_ms=ref * 1e3, pruned_ms=statistics.median(b) * 1e3, method_ms=statistics.median(m) * 1e3,
        overhead_ms=over * 1e3, overhead_ci_ms=[lo * 1e3, hi * 1e3],
        pipeline_ms=pipe * 1e3, pipeline_ci_ms=[plo * 1e3, phi * 1e3],
        pipeline_over_reference=pipe / ref,
        meets_target=pipe * 1e3 <= row["target_ms"],
        meets_target_including_method=over * 1e3 <= row["target_ms"],
        raw_s={"reference": a, "pruned": b, "method": m},
    )
    row["verdict"] = verdict(row)
    return row


def loop_check(model, inputs: dict, repeats: int, warmup: int = 3) -> dict:
    """The model's own forward with the written-out decoder body (no drop) against the model's own
    forward, on the compact inputs of keep_all at the vision stage: equal logits, and the time
    difference with its interval (negative: the in-LLM reference is that much faster than the model's
    own code would be, and the in-LLM overheads are overstated by as much)."""
    from vtprune.methods.base import make_method
    from vtprune.models import family_of

    import vtprune

    family = family_of(model)
    twin = make_twin(model)
    with vtprune.pruned(twin, make_method("keep_all", stage="vision")) as handle, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cap = capture(twin, handle, inputs)
    own = lambda k: model(**cap.lm_kwargs, use_cache=True, logits_to_keep=k).logits

    def body(k):
        with dropping_body(model, family, {}):
            return model(**cap.lm_kwargs, use_cache=True, logits_to_keep=k).logits

    with torch.no_grad():
        diff = float((own(0) - body(0)).abs().max())
    t_own, t_body = [], []
    with torch.no_grad(), gc_paused():
        for r in range(warmup + repeats):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                own(1) if which == 0 else body(1)
                t = time.perf_counter() - start
                if r >= warmup:
                    (t_own if which == 0 else t_body).append(t)
    d, lo, hi = bootstrap_diff(t_body, t_own)
    return {"max_abs_logit_diff": diff, "own_forward_ms": statistics.median(t_own) * 1e3,
            "body_forward_ms": statistics.median(t_body) * 1e3, "body_minus_own_ms": d * 1e3,
            "ci_ms": [lo * 1e3, hi * 1e3]}


def unavoidable_work(model, inputs: dict, repeats: int) -> dict:
    """Median ms of work the unmodified model does itself on the full-length input and that the
    pipeline must also do (it counts as overhead here): Qwen's M-RoPE index of the full sequence,
    LLaVA-NeXT's packing (unpadding + newline tokens) of the projected crop features."""
    from vtprune.models import family_of

    family = family_of(model)
    inner = model.model
    if family in QWEN:
        name = "get_rope_index(full sequence)"
        fn = lambda: inner.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                          image_grid_thw=inputs["image_grid_thw"],
                                          attention_mask=inputs["attention_mask"])
    elif family in ANYRES:
        name = "pack_image_features(projected crops)"
        pixels = _vision_pixels(model, family, inputs)["pixel_values"]
        cfg = model.config
        with torch.no_grad():
            tower = inner.vision_tower(pixels, output_hidden_states=True, return_dict=True)
            hidden = tower.hidden_states[cfg.vision_feature_layer]
            feats = inner.multi_modal_projector(hidden[:, 1:] if cfg.vision_feature_select_strategy == "default"
                                                else hidden)
        if family == "llava_next":
            fn = lambda: inner.pack_image_features([feats], inputs["image_sizes"], cfg.vision_feature_select_strategy,
                                                   image_newline=inner.image_newline)
        else:  # OneVision: no select strategy, its own down-sampling rule
            fn = lambda: inner.pack_image_features([feats], inputs["image_sizes"], image_newline=inner.image_newline,
                                                   vision_aspect_ratio=cfg.vision_aspect_ratio)
    else:
        return {}
    times = []
    with torch.no_grad():
        for r in range(repeats + 3):
            start = time.perf_counter()
            fn()
            if r >= 3:
                times.append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e3}


def measure_model(model, inputs: dict, plan: list[Config], repeats: int, warmup: int = 3,
                  progress=None, check_repeats: int | None = None) -> dict:
    """Every configuration of ``plan`` on one model; the core of the script (the test calls it).

    The configurations are measured round-robin: round r runs one (a, b) pair of every configuration
    (a first in even rounds, b first in odd ones; the configurations in an order rotated by r), so
    that each configuration's rounds spread over the whole run and bursts of load on a shared machine
    fall on all of them alike instead of on whichever was being measured."""
    from vtprune.models import family_of

    say = progress or (lambda msg: None)
    family = family_of(model)
    load_before = _loadavg()
    results: list[dict | Slot] = []
    for config in plan:
        say(f"{family}: prepare {config.label} {config.kwargs}")
        results.append(prepare_config(model, inputs, config))
    slots = [x for x in results if isinstance(x, Slot)]
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(), gc_paused():
        warnings.simplefilter("ignore")
        for r in range(warmup + repeats):
            if r and r % 50 == 0:
                gc.collect()  # outside the clocks; bounds what cyclic garbage can pile up
            if r % 20 == 0:
                say(f"{family}: round {r}/{warmup + repeats} ({time.perf_counter() - t0:.0f} s)")
            k = r % len(slots) if slots else 0
            for slot in slots[k:] + slots[:k]:
                ta, tb, tm = run_round(model, inputs, slot, "a" if r % 2 == 0 else "b")
                if r >= warmup:
                    slot.a.append(ta)
                    slot.b.append(tb)
                    slot.m.append(tm)
    rows = [finish_config(x) if isinstance(x, Slot) else x for x in results]
    for row in rows:
        say(f"  {row['method']}: " + (_row_line(row) if row["status"] == "ok" else row["error"]))
    n_check = repeats if check_repeats is None else check_repeats
    check, unavoidable = None, {}
    if n_check > 0:
        say(f"{family}: loop check")
        check = loop_check(model, inputs, n_check, warmup)
        unavoidable = unavoidable_work(model, inputs, n_check)
    ids = inputs["input_ids"][0]
    return {"family": family, "sequence_tokens": int(ids.shape[0]),
            "visual_tokens": int((ids == model.config.image_token_id).sum()),
            "num_layers": model.config.get_text_config().num_hidden_layers,
            "hidden_size": model.config.get_text_config().hidden_size, "schedule": "round-robin",
            "rows": rows, "loop_check": check, "unavoidable_ms": unavoidable,
            "loadavg_before_after": [load_before, _loadavg()]}


def _git_state() -> str | None:
    """``<commit>`` of the checkout the script runs in, ``+dirty`` when this script or ``src/`` has
    uncommitted changes (edits to docs or results do not count)."""
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        run = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True,
                                         check=True).stdout.strip()
        top = Path(run("rev-parse", "--show-toplevel"))
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", str(Path(__file__).resolve()),
                    str(top / "src"))
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _loadavg() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (other users' work slows both calls alike, but the
    absolute milliseconds grow with it)."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------
# reporting


def _ci(row, key) -> str:
    lo, hi = row[key]
    return f"[{lo:+.2f}, {hi:+.2f}]"


def _row_line(r) -> str:
    return (f"ref {r['reference_ms']:.2f} ms, pruned {r['pruned_ms']:.2f} ms, overhead {r['overhead_ms']:+.2f} "
            f"{_ci(r, 'overhead_ci_ms')}, method {r['method_ms']:.2f}, pipeline {r['pipeline_ms']:+.2f} "
            f"{_ci(r, 'pipeline_ci_ms')}, logit diff {r['max_abs_logit_diff']:.1e}")


HEADER = ["model", "method", "kind", "tokens in→LLM→final", "ref ms", "pruned ms", "overhead ms", "95% CI",
          "method ms", "pipeline ms", "95% CI ", "pipe/ref", "target", "verdict", "max abs Δlogit"]


def verdict(row: dict, short: bool = False) -> str:
    """Against the target, by the 95 % interval of the pipeline overhead: "meets" (the whole interval
    is at or below the target), "misses by X" (the whole interval is above it; X = point estimate −
    target), "unresolved" (the interval spans the target)."""
    lo, hi = row["pipeline_ci_ms"]
    target = row["target_ms"]
    if len(row.get("raw_s", {}).get("pruned", ())) < MIN_ROUNDS:
        return "?" if short else f"unresolved (< {MIN_ROUNDS} rounds)"
    if hi <= target:
        return "✓" if short else "meets"
    if lo > target:
        excess = row["pipeline_ms"] - target
        return f"✗ +{excess:.2f}" if short else f"misses by {excess:.2f}"
    return "?" if short else "unresolved"


def table_rows(payload: dict) -> list[list[str]]:
    out = []
    for res in payload["results"]:
        name = res["model"]
        for r in res["rows"]:
            if r["status"] != "ok":
                out.append([name, r["method"], "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "skipped",
                            r["error"].split("\n")[0][:80]])
                continue
            t = r["tokens"]
            meets = verdict(r)
            out.append([name, r["method"], r["kind"],
                        f"{t['sequence_in']}→{t['entering_llm']}→{t['after_llm_stages']}",
                        f"{r['reference_ms']:.2f}", f"{r['pruned_ms']:.2f}", f"{r['overhead_ms']:+.2f}",
                        _ci(r, "overhead_ci_ms"), f"{r['method_ms']:.2f}", f"{r['pipeline_ms']:+.2f}",
                        _ci(r, "pipeline_ci_ms"), f"{r['pipeline_ms'] / r['reference_ms']:.2f}",
                        f"≤ {r['target_ms']:g}", meets, f"{r['max_abs_logit_diff']:.1e}"])
    return out


def format_text(payload: dict) -> str:
    rows = [HEADER] + table_rows(payload)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"$ {payload['command']}", _env_line(payload)]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [""] + _check_lines(payload)
    return "\n".join(lines)


def _env_line(payload) -> str:
    env = payload["environment"]
    return (f"{env['device']} ({env['cpu_threads']} thread(s)); torch {env['torch']}, transformers "
            f"{env['transformers']}; {env['date']}; {payload['args']['repeats']} rounds after "
            f"{payload['args']['warmup']} warm-up")


def _check_lines(payload) -> list[str]:
    out = []
    for res in payload["results"]:
        c = res["loop_check"]
        if c is None:
            continue
        out.append(f"loop check {res['model']}: written-out decoder − model's own = {c['body_minus_own_ms']:+.2f} ms "
                   f"[{c['ci_ms'][0]:+.2f}, {c['ci_ms'][1]:+.2f}] (own {c['own_forward_ms']:.2f} ms), "
                   f"max |Δlogit| {c['max_abs_logit_diff']:.1e}")
        for name, ms in res.get("unavoidable_ms", {}).items():
            out.append(f"unavoidable {res['model']}: {name} {ms:.2f} ms (the unmodified model's own work on the "
                       f"full input, counted as overhead)")
    return out


def format_markdown(payload: dict) -> str:
    lines = ["# Pipeline overhead on CPU", "", f"`{payload['command']}`", "", _env_line(payload), "",
             "overhead = median(pruned) − median(reference); pipeline = median(pruned − method time) − "
             "median(reference); intervals: 95 % paired bootstrap over the rounds. Targets: pipeline ≤ 1 ms "
             "(pre-LLM), ≤ 2 ms (in-LLM); verdict by the interval: meets (all of it ≤ target), misses (all of "
             "it above; by point estimate − target), unresolved (it spans the target). pipe/ref: pipeline ms / "
             "reference ms. The JSON has every round's times, the load average and the code's git commit.", "",
             "| " + " | ".join(h.strip() for h in HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in table_rows(payload):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
    lines += [""] + [f"- {x}" for x in _check_lines(payload)]
    lines += ["", "Pipeline ms [95 % CI], ✓ meets / ✗ +excess misses / ? unresolved, · method ms:", "",
              summary_markdown([payload])]
    return "\n".join(lines) + "\n"


def dump_json(payload: dict) -> str:
    """Indented JSON with every list of numbers on one line and raw times rounded to 0.1 µs."""
    import re

    def rounded(obj):
        if isinstance(obj, dict):
            return {k: ([round(x, 7) for x in v] if k in ("reference", "pruned", "method", "own", "body")
                        and isinstance(v, list) else rounded(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [rounded(x) for x in obj]
        return obj

    text = json.dumps(rounded(payload), indent=1, default=_json_default)
    text = text.replace(str(Path(__file__).resolve().parents[1]) + "/", "")  # no machine paths in results
    number_list = re.compile(r"\[\s*(-?[0-9][-0-9.e+]*(?:,\s*-?[0-9][-0-9.e+]*)*)\s*\]")
    return number_list.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def summary_markdown(payloads: list[dict]) -> str:
    """One Markdown matrix over one or more runs: a row per method, a column per model, each cell the
    pipeline overhead (ms, overhead without the method's own time) with its interval and whether it
    meets the target, then the method's own time."""
    models, cells, kinds = [], {}, {}
    for payload in payloads:
        for res in payload["results"]:
            models.append(res["model"])
            for r in res["rows"]:
                if r["status"] != "ok":
                    cells[(r["method"], res["model"])] = "n/a"
                    continue
                kinds[r["method"]] = r["kind"]
                mark = verdict(r, short=True)
                lo, hi = r["pipeline_ci_ms"]
                cells[(r["method"], res["model"])] = (f"{r['pipeline_ms']:.2f} [{lo:.2f}, {hi:.2f}] {mark} "
                                                       f"· {r['method_ms']:.2f}")
    methods = sorted({m for m, _ in cells}, key=lambda m: (not m.startswith("keep_all"), m))
    lines = ["| method | kind (target) | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for m in methods:
        kind = kinds.get(m, "-")
        target = f"{kind} (≤ {TARGET_MS[kind]:g} ms)" if kind in TARGET_MS else "-"
        lines.append(f"| {m} | {target} | " + " | ".join(cells.get((m, x), "-") for x in models) + " |")
    return "\n".join(lines) + "\n"


def _json_default(obj):
    if isinstance(obj, (Path, torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(type(obj).__name__)


# --------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    from vtprune.tiny import FAMILIES

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="tiny families (default: all)")
    p.add_argument("--preset", action="append", default=None,
                   help="a preset's full-width architecture instead of the tiny models (repeatable), with --num-layers")
    p.add_argument("--num-layers", type=int, default=2, help="decoder and vision-tower depth of --preset models (default 2)")
    p.add_argument("--methods", default=None,
                   help="comma-separated labels or names (keep_all:vision, keep_all:llm, fastv, ...; default: all)")
    p.add_argument("--keep", type=int, default=None, help="keep= of every method (default 4 tiny, 64 presets)")
    p.add_argument("--repeats", type=int, default=200, help="timed rounds per method (default 200)")
    p.add_argument("--warmup", type=int, default=3, help="discarded rounds first (default 3)")
    p.add_argument("--check-repeats", type=int, default=None, help="rounds of the loop check (default --repeats; 0: skip it)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--image-size", default=None, help="HxW (LLaVA-NeXT / Qwen; default tiny sizes or 672x672)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md (e.g. benchmarks/results/DATE_cpu_overhead)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                   help="print the method × model Markdown matrix of written results and exit (measures nothing)")
    p.add_argument("--render", nargs="+", metavar="JSON", default=None,
                   help="rewrite the .md next to each written .json from its numbers and exit (measures nothing)")
    return p.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from vtprune.bench.latency import environment

    torch.set_num_threads(args.threads)
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[overhead] {m}", file=sys.stderr, flush=True))
    size = tuple(int(x) for x in args.image_size.lower().split("x")) if args.image_size else None
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    results = []
    targets = [(p, None) for p in args.preset] if args.preset else [(None, f) for f in args.families.split(",")]
    for preset, family in targets:
        tiny = preset is None
        say(f"building {family or preset}" + ("" if tiny else f" with {args.num_layers} layers"))
        model = build_tiny(family) if tiny else build_preset(preset, args.num_layers)
        from vtprune.models import family_of

        fam = family_of(model)
        layers = model.config.get_text_config().num_hidden_layers
        keep = args.keep or (4 if tiny else 64)
        plan = method_plan(fam, layers, keep, methods, tiny=tiny)
        inputs = make_inputs(model, tiny, args.prompt_tokens, size)
        res = measure_model(model, inputs, plan, args.repeats, args.warmup, progress=say,
                            check_repeats=args.check_repeats)
        res["model"] = f"tiny {fam}" if tiny else f"{preset} ({args.num_layers} layers)"
        res["keep"] = keep
        results.append(res)
        del model
        gc.collect()
    payload = {"command": "python benchmarks/overhead.py " + " ".join(shlex.quote(a) for a in argv),
               "git": _git_state(),
               "environment": environment(torch.device("cpu")),
               "args": {k: v for k, v in vars(args).items()}, "targets_ms": TARGET_MS, "results": results}
    return payload


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.summarize:
        print(summary_markdown([json.loads(Path(f).read_text()) for f in args.summarize]), end="")
        return 0
    if args.render:
        for f in args.render:
            md = Path(f).with_suffix(".md")
            md.write_text(format_markdown(json.loads(Path(f).read_text())))
            print(f"wrote {md}")
        return 0
    payload = run(args, argv)
    print(format_text(payload))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        js, md = Path(f"{out}.json"), Path(f"{out}.md")
        js.write_text(dump_json(payload))
        md.write_text(format_markdown(payload))
        print(f"wrote {js} and {md}")
    bad = [(res["model"], r["method"]) for res in payload["results"] for r in res["rows"]
           if r["status"] == "ok" and not r["max_abs_logit_diff"] <= LOGIT_TOLERANCE * max(1.0, r["logit_scale"])]
    if bad:
        print(f"reference differs from the pruned call (logits): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
