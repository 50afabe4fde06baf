"""FLOPs and KV-cache calculators: pure config arithmetic, no weights, no forward pass.

Two FLOPs conventions are offered; both count FLOPs = 2 × multiply-accumulates (MACs), i.e. one
multiply plus one add each count as a FLOP, and ignore element-wise work (norms, activations,
softmax, RoPE, residual adds, biases):

* :func:`paper_flops` — the convention the pruning papers use (FastV's formula). Per decoder layer
  with ``n`` tokens, hidden ``d``, FFN width ``m``: ``4·n·d² + 2·n²·d + 2·n·d·m`` MACs, summed over
  the LLM layers. It ignores grouped-query attention, counts two FFN matrices (SwiGLU has three),
  and leaves out the vision tower, the projector and the lm_head. Use it to compare with papers.
* :func:`exact_flops` — what the architecture computes during the prefill of one sample:
  q/k/v/o projections with the real head counts (GQA), ``q·kᵀ`` and ``attn·v`` over the full
  ``n × n`` score matrix (no causal halving, as eager/SDPA math kernels compute and as
  ``torch.utils.flop_counter`` counts), the three SwiGLU matrices, the lm_head for the last token
  only (``generate`` keeps one logit row in the prefill), the vision tower over all its layers at its
  full, unpruned token count (CLS included), the projector (LLaVA's 2-layer MLP, Qwen's patch
  merger(s)), and an optional caller-supplied pruning-method term.

In-LLM pruning schedules (FastV, PDrop, OccamToken stage II) are lists of ``(layer, visual_tokens)``
stages: from decoder layer ``layer`` on (0-based, that layer's input is pruned), ``visual_tokens``
visual tokens remain. ``[(2, 64)]`` with 576 visual tokens is FastV K=2: layers 0–1 see 576, 2–31 see 64.

:func:`kv_cache_bytes` gives ``2 · layers · kv_heads · head_dim · tokens · bytes`` (K and V).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

from ..errors import VTPruneError

Schedule = Sequence[tuple[int, int]]



# --------------------------------------------------------------------------------------------------
# config access


def _as_config(config: Any):
    """Accept a ``PretrainedConfig``, a preset name / Hub id of a preset, or a local config path."""
    if isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
        from ..presets import load_config

        return load_config(config)
    if isinstance(config, dict):
        from ..presets import config_from_dict

        return config_from_dict(config)
    return config


@dataclass(frozen=True)
class LMShape:
    """The LLM dimensions the formulas need."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def lm_shape(config: Any) -> LMShape:
    """Read the decoder's dimensions from a full VLM config (or a bare text config)."""
    cfg = _as_config(config)
    tc = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    return LMShape(
        layers=tc.num_hidden_layers,
        hidden=tc.hidden_size,
        ffn=tc.intermediate_size,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=tc.vocab_size,
    )


def _family(cfg: Any) -> str:
    return getattr(cfg, "model_type", "") or ""


def _flops_info(cfg: Any):
    """The family's :class:`~vtprune.models.families.FlopsInfo`, or None for a model type vtprune does not
    declare. A Qwen2-VL-style tower (``embed_dim`` / ``mlp_ratio`` naming, fc1/fc2 MLP, 2×2 merger, no
    windows) is recognised from its vision config."""
    from ..models.families import FlopsInfo, family_of_config

    family = family_of_config(cfg)
    if family is not None and family.flops is not None:
        return family.flops
    vc = getattr(cfg, "vision_config", None)
    if vc is not None and all(hasattr(vc, a) for a in ("embed_dim", "mlp_ratio", "spatial_merge_size")):
        return FlopsInfo(tower="merger", mlp_mats=2)
    return None


# --------------------------------------------------------------------------------------------------
# schedules


def parse_schedule(text: str | None) -> list[tuple[int, int]]:
    """``"2:64"`` or ``"2:64,16:32"`` -> ``[(2, 64), (16, 32)]``; empty / None -> ``[]``."""
    if not text:
        return []
    stages = []
    for part in text.split(","):
        try:
            layer, tokens = part.split(":")
            stages.append((int(layer), int(tokens)))
        except ValueError:
            raise ValueError(f"bad schedule stage {part!r}: expected LAYER:TOKENS, e.g. '2:64'") from None
    return stages


def tokens_per_layer(num_layers: int, visual_tokens: int, schedule: Schedule | None = None) -> list[int]:
    """Visual tokens entering each decoder layer: ``visual_tokens`` until the first stage, then each
    stage's count from its layer on. Stages must have increasing layers in ``[0, num_layers)`` and
    non-increasing, non-negative token counts.
    """
    if visual_tokens < 0:
        raise ValueError(f"visual_tokens must be >= 0, got {visual_tokens}")
    counts = [visual_tokens] * num_layers
    last_layer, last_tokens = -1, visual_tokens
    for layer, tokens in schedule or ():
        if not 0 <= layer < num_layers:
            raise ValueError(f"schedule layer {layer} outside the model's decoder layers 0..{num_layers - 1}")
        if layer <= last_layer:
            raise ValueError(f"schedule layers must increase; got layer {layer} after {last_layer}")
        if not 0 <= tokens <= last_tokens:
            raise ValueError(
                f"schedule stage ({layer}, {tokens}): token counts must be >= 0 and never grow "
                f"(previous count {last_tokens})"
            )
        counts[layer:] = [tokens] * (num_layers - layer)
        last_layer, last_tokens = layer, tokens
    return counts


def _stages(counts: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal counts: ``(first_layer, last_layer, visual_tokens)``."""
    out: list[tuple[int, int, int]] = []
    for i, c in enumerate(counts):
        if out and out[-1][2] == c:
            out[-1] = (out[-1][0], i, c)
        else:
            out.append((i, i, c))
    return out


# --------------------------------------------------------------------------------------------------
# paper convention (FastV)


def paper_layer_macs(n: int, d: int, m: int) -> int:
    """FastV's per-layer MACs: ``4·n·d² + 2·n²·d + 2·n·d·m``."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def paper_flops(config: Any, visual_tokens: int, text_tokens: int = 32, schedule: Schedule | None = None) -> float:
    """LLM prefill FLOPs in the papers' (FastV) convention, 2 × MACs summed over decoder layers.

    ``n = visual + text`` tokens per layer (visual count following ``schedule`` if given). Vision
    tower, projector and lm_head are not counted. LLaVA-NeXT-7B: 2880 -> 33.76 TFLOPs, 160 -> 1.95;
    LLaVA-1.5-7B: 576 -> 6.31, 64 -> 0.97 (text 32).
    """
    s = lm_shape(config)
    counts = tokens_per_layer(s.layers, visual_tokens, schedule)
    return float(sum(2 * paper_layer_macs(v + text_tokens, s.hidden, s.ffn) for v in counts))


def equivalent_visual_tokens(
    config: Any, visual_tokens: int, schedule: Schedule | None, text_tokens: int = 32
) -> dict[str, float]:
    """What a schedule amounts to as a constant visual-token count over all layers.

    ``layer_average``: mean visual tokens over decoder layers (what papers report as the "equivalent"
    budget, e.g. FastV 576 -> 64 at layer 2 on 32 layers = 96). ``flops_matched``: the constant count
    with the same :func:`paper_flops` total (solves the quadratic).
    """
    s = lm_shape(config)
    counts = tokens_per_layer(s.layers, visual_tokens, schedule)
    target = paper_flops(config, visual_tokens, text_tokens, schedule) / (2 * s.layers)
    d, m = s.hidden, s.ffn
    # 2·d·n² + (4d² + 2dm)·n - target = 0
    a, b = 2 * d, 4 * d * d + 2 * d * m
    n = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
    return {"layer_average": sum(counts) / len(counts), "flops_matched": n - text_tokens}


# --------------------------------------------------------------------------------------------------
# exact count: LLM


def llm_layer_flops(s: LMShape, n: int, causal: bool = False) -> dict[str, float]:
    """Exact FLOPs (2 × MACs) of one decoder layer on ``n`` tokens, by part.

    ``attention_proj``: q and o (``heads·head_dim``) plus k and v (``kv_heads·head_dim``, GQA).
    ``attention_scores``: ``q·kᵀ`` and ``attn·v`` over all ``n²`` pairs (``causal=True`` counts only
    the ``n(n+1)/2`` unmasked ones). ``mlp``: the three SwiGLU matrices (gate, up, down).
    """
    q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
    pairs = n * (n + 1) / 2 if causal else n * n
    return {
        "attention_proj": 2.0 * n * s.hidden * (2 * q_dim + 2 * kv_dim),
        "attention_scores": 2.0 * 2 * pairs * q_dim,
        "mlp": 2.0 * 3 * n * s.hidden * s.ffn,
    }


def llm_flops(
    config: Any,
    visual_tokens: int,
    text_tokens: int = 32,
    schedule: Schedule | None = None,
    lm_head_tokens: int = 1,
    causal: bool = False,
) -> dict[str, float]:
    """Exact LLM prefill FLOPs by part: ``attention_proj``, ``attention_scores``, ``mlp``, ``lm_head``.

    ``lm_head_tokens``: rows of logits computed (1 = last token, as ``generate`` does in the prefill;
    0 leaves the lm_head out).
    """
    s = lm_shape(config)
    out = {"attention_proj": 0.0, "attention_scores": 0.0, "mlp": 0.0}
    for v in tokens_per_layer(s.layers, visual_tokens, schedule):
        for k, x in llm_layer_flops(s, v + text_tokens, causal).items():
            out[k] += x
    out["lm_head"] = 2.0 * lm_head_tokens * s.hidden * s.vocab
    return out


# --------------------------------------------------------------------------------------------------
# exact count: vision tower and projector


def _vit_layer_macs(tokens: int, hidden: int, inter: int, mlp_mats: int) -> int:
    """One ViT block without attention scores: qkv + out projections and the MLP."""
    return 4 * tokens * hidden * hidden + mlp_mats * tokens * hidden * inter


def clip_tower_flops(vision_config: Any, crops: int = 1) -> float:
    """CLIP-style tower (LLaVA): conv patch embedding, then every layer on patches + CLS, per crop.

    All layers are counted even when the features come from layer -2: transformers runs the whole
    tower. CLIP's MLP has two matrices (fc1, fc2).
    """
    vc = vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    tokens = patches + (1 if vc.model_type == "clip_vision_model" else 0)
    h, i = vc.hidden_size, vc.intermediate_size
    embed = patches * vc.num_channels * vc.patch_size**2 * h
    per_layer = _vit_layer_macs(tokens, h, i, 2) + 2 * tokens * tokens * h
    return 2.0 * crops * (embed + vc.num_hidden_layers * per_layer)


def llava_projector_flops(config: Any, tokens: int) -> float:
    """LLaVA's 2-layer MLP projector (vision hidden -> d -> d) on ``tokens`` patch features."""
    vc, tc = config.vision_config, config.get_text_config()
    layers = config.vision_feature_layer
    width = vc.hidden_size * (1 if isinstance(layers, int) else len(layers))
    return 2.0 * tokens * (width * tc.hidden_size + tc.hidden_size * tc.hidden_size)


def _qwen_vision_dims(vc: Any, mlp_mats: int) -> tuple[int, int, int]:
    """(hidden, intermediate, MLP matrices) of a Qwen vision block (``mlp_mats`` from the family)."""
    if hasattr(vc, "embed_dim") and hasattr(vc, "mlp_ratio"):  # Qwen2-VL naming, fc1/fc2 MLP
        return vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio), 2
    return vc.hidden_size, vc.intermediate_size, mlp_mats


def _chunks(length: int, size: int) -> list[int]:
    return [size] * (length // size) + ([length % size] if length % size else [])


def _window_pairs(grid: tuple[int, int, int], vc: Any) -> int:
    """Sum over Qwen2.5-VL attention windows of (tokens in window)², for one image/video."""
    t, h, w = grid
    m = vc.spatial_merge_size
    ws = vc.window_size // m // vc.patch_size  # window side in merged tokens
    return t * sum((r * c * m * m) ** 2 for r in _chunks(h // m, ws) for c in _chunks(w // m, ws))


def grid_for_tokens(merged_tokens: int, merge: int = 2) -> tuple[int, int, int]:
    """A ``(t, h, w)`` patch grid giving ``merged_tokens`` LLM tokens, as square as the count allows."""
    if merged_tokens <= 0:
        raise ValueError(f"need a positive visual token count for the Qwen vision tower, got {merged_tokens}")
    a = max(k for k in range(1, math.isqrt(merged_tokens) + 1) if merged_tokens % k == 0)
    return (1, a * merge, merged_tokens // a * merge)


def qwen_tower_flops(config: Any, grids: Iterable[tuple[int, int, int]]) -> dict[str, float]:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL tower on images given as ``(t, h, w)`` patch grids.

    Returns ``vision_tower`` (patch embedding + blocks; Qwen2.5-VL uses window attention except in
    ``fullatt_block_indexes``; attention never crosses images or frames) and ``projector`` (the 2×2
    patch merger MLP, plus Qwen3-VL's DeepStack mergers), both in FLOPs.
    """
    vc, info = config.vision_config, _flops_info(config)
    h, inter, mats = _qwen_vision_dims(vc, info.mlp_mats if info is not None else 2)
    depth, m2 = vc.depth, vc.spatial_merge_size**2
    full_layers = depth
    windowed = 0
    if info is not None and info.windowed:
        full_layers = len(vc.fullatt_block_indexes)
        windowed = depth - full_layers
    out_dim = getattr(vc, "out_hidden_size", None) or vc.hidden_size  # qwen2_vl: hidden_size is the LLM's
    mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or ())
    tower = merger = 0
    for grid in grids:
        t, gh, gw = grid
        p = t * gh * gw
        full_pairs = t * (gh * gw) ** 2  # attention is per frame
        win_pairs = _window_pairs(grid, vc) if windowed else 0
        embed = p * vc.in_channels * vc.temporal_patch_size * vc.patch_size**2 * h
        scores = 2 * h * (full_layers * full_pairs + windowed * win_pairs)
        tower += embed + depth * _vit_layer_macs(p, h, inter, mats) + scores
        merged = p // m2
        merger += mergers * merged * ((m2 * h) ** 2 + m2 * h * out_dim)
    return {"vision_tower": 2.0 * tower, "projector": 2.0 * merger}


def _grids(image_grid: Any) -> list[tuple[int, int, int]]:
    """Normalise ``(h, w)``, ``(t, h, w)`` or a list of them to a list of ``(t, h, w)``."""
    if image_grid and isinstance(image_grid[0], int):
        image_grid = [image_grid]
    out = []
    for g in image_grid:
        g = tuple(int(x) for x in g)
        if len(g) == 2:
            g = (1,) + g
        if len(g) != 3:
            raise ValueError(f"image grid {g} must be (h, w) or (t, h, w) in patches")
        out.append(g)
    return out


def vision_flops(
    config: Any,
    full_visual_tokens: int,
    image_grid: Any = None,
    projector_tokens: int | None = None,
) -> dict[str, float]:
    """Vision tower and projector FLOPs for images giving ``full_visual_tokens`` unpruned LLM tokens.

    LLaVA / LLaVA-NeXT: ``ceil(full / image_seq_length)`` crops of the 336 px tower (LLaVA-NeXT's
    default 2880 = 5 crops); the projector runs on ``projector_tokens`` (default: all
    ``full_visual_tokens``; pass the kept count for methods that prune before the projector).
    Qwen: ``image_grid`` in patches, ``(h, w)`` / ``(t, h, w)`` or a list; default: the squarest grid
    giving ``full_visual_tokens`` merged tokens. The merger always sees every patch.
    """
    cfg = _as_config(config)
    info = _flops_info(cfg)
    if info is not None and info.tower == "clip":
        per_crop = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        crops = math.ceil(full_visual_tokens / per_crop)
        proj = full_visual_tokens if projector_tokens is None else projector_tokens
        return {"vision_tower": clip_tower_flops(cfg.vision_config, crops), "projector": llava_projector_flops(cfg, proj)}
    if info is not None and info.tower == "merger":
        m = cfg.vision_config.spatial_merge_size
        grids = _grids(image_grid) if image_grid is not None else [grid_for_tokens(full_visual_tokens, m)]
        return qwen_tower_flops(cfg, grids)
    from ..models.families import all_families

    known = ", ".join(t for f in all_families() if f.flops is not None for t in f.model_types)
    raise ValueError(
        f"no vision-tower formula for model_type {_family(cfg)!r}; supported: {known} and Qwen2-VL-style towers "
        "(pass include_vision=False to count the LLM only)"
    )


def default_full_visual_tokens(config: Any, visual_tokens: int) -> int:
    """Unpruned visual tokens of one image when the caller gives none: LLaVA 576, LLaVA-NeXT 2880
    (672×672, 5 crops, no unpadding), Qwen ``visual_tokens``; never fewer than ``visual_tokens``.
    """
    cfg = _as_config(config)
    info = _flops_info(cfg)
    native = 0
    if info is not None and info.tower == "clip":  # the config fixes the count: crops × patches per crop
        per_crop = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        native = per_crop * info.default_crops
    return max(native, visual_tokens)


def exact_flops(
    config: Any,
    visual_tokens: int,
    text_tokens: int = 32,
    *,
    schedule: Schedule | None = None,
    full_visual_tokens: int | None = None,
    image_grid: Any = None,
    projector_tokens: int | None = None,
    method_flops: float = 0.0,
    include_vision: bool = True,
    lm_head_tokens: int = 1,
    causal: bool = False,
) -> dict[str, float]:
    """Exact prefill FLOPs (2 × MACs of every matmul/conv) of one sample, by component.

    ``visual_tokens`` enter the LLM (then follow ``schedule``); the vision tower and projector run
    at ``full_visual_tokens`` (default :func:`default_full_visual_tokens`), since pruning happens
    after them. ``method_flops`` is the pruning method's own cost, added as ``method``.

    Keys: ``vision_tower``, ``projector``, ``llm_attention_proj``, ``llm_attention_scores``,
    ``llm_mlp``, ``lm_head``, ``method``, ``llm`` (sum of the four LLM parts) and ``total``.
    """
    cfg = _as_config(config)
    if method_flops < 0:
        raise ValueError(f"method_flops must be >= 0, got {method_flops}")
    out = {"vision_tower": 0.0, "projector": 0.0}
    if include_vision:
        full = full_visual_tokens if full_visual_tokens is not None else default_full_visual_tokens(cfg, visual_tokens)
        out.update(vision_flops(cfg, full, image_grid, projector_tokens))
    llm = llm_flops(cfg, visual_tokens, text_tokens, schedule, lm_head_tokens, causal)
    out.update({f"llm_{k}" if k != "lm_head" else k: v for k, v in llm.items()})
    out["method"] = float(method_flops)
    out["llm"] = sum(llm.values())
    out["total"] = out["vision_tower"] + out["projector"] + out["llm"] + out["method"]
    return out


def flops_stages(
    config: Any, visual_tokens: int, text_tokens: int = 32, schedule: Schedule | None = None
) -> list[dict[str, float]]:
    """Per-stage LLM breakdown of a schedule: layers, visual tokens, and both conventions' FLOPs
    (``paper_flops``; ``exact_flops``: decoder layers only, no lm_head).
    """
    s = lm_shape(config)
    rows = []
    for first, last, v in _stages(tokens_per_layer(s.layers, visual_tokens, schedule)):
        layers, n = last - first + 1, v + text_tokens
        exact = sum(llm_layer_flops(s, n).values())
        rows.append({
            "first_layer": first, "last_layer": last, "visual_tokens": v, "n": n,
            "paper_flops": 2.0 * layers * paper_layer_macs(n, s.hidden, s.ffn), "exact_flops": layers * exact,
        })
    return rows


# --------------------------------------------------------------------------------------------------
# KV cache


def kv_cache_bytes(config: Any, tokens: int | Sequence[int], dtype_bytes: int = 2) -> int:
    """KV-cache size: ``2 (K, V) · layers · kv_heads · head_dim · tokens · dtype_bytes``.

    ``tokens``: one count for every layer, or a per-layer sequence (a schedule whose early layers keep
    their unpruned KV). Vicuna-7B fp16: 524288 bytes (0.5 MiB) per token.
    """
    s = lm_shape(config)
    per_token_layer = 2 * s.kv_heads * s.head_dim * dtype_bytes
    if isinstance(tokens, int):
        return s.layers * tokens * per_token_layer
    tokens = list(tokens)
    if len(tokens) != s.layers:
        raise ValueError(f"per-layer token list has {len(tokens)} entries for {s.layers} decoder layers")
    return sum(tokens) * per_token_layer


# --------------------------------------------------------------------------------------------------
# CLI


@dataclass
class Row:
    label: str
    visual_tokens: int
    schedule: list[tuple[int, int]]
    paper_tflops: float
    exact_llm_tflops: float
    exact_total_tflops: float
    kv_mib: float
    kv_compacted_mib: float
    breakdown: dict[str, float]


def _row(cfg: Any, visual: int, args: argparse.Namespace, full: int, schedule: list[tuple[int, int]]) -> Row:
    s = lm_shape(cfg)
    text = args.text
    exact = exact_flops(cfg, visual, text, schedule=schedule, full_visual_tokens=full,
                        image_grid=args.grid, method_flops=args.method_flops)
    counts = tokens_per_layer(s.layers, visual, schedule)
    label = str(visual) + "".join(f"->{t}@L{layer}" for layer, t in schedule)
    return Row(
        label=label, visual_tokens=visual, schedule=schedule,
        paper_tflops=paper_flops(cfg, visual, text, schedule) / 1e12,
        exact_llm_tflops=exact["llm"] / 1e12, exact_total_tflops=exact["total"] / 1e12,
        kv_mib=kv_cache_bytes(cfg, [c + text for c in counts], args.dtype_bytes) / 2**20,
        kv_compacted_mib=kv_cache_bytes(cfg, counts[-1] + text, args.dtype_bytes) / 2**20,
        breakdown=exact,
    )


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def _parse_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one token count")
    return vals


def _parse_grid(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW or TxHxW in patches, got {text!r}") from None


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``flops`` subcommand to an argparse ``subparsers`` object; it calls :func:`run_cli`."""
    p = subparsers.add_parser(
        "flops", help="FLOPs (paper and exact conventions) and KV-cache size for visual-token budgets",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="preset name (see --list), Hub id of a preset, or a dir with config.json")
    p.add_argument("--visual", type=_parse_ints, required=True,
                   help="visual tokens entering the LLM, comma-separated; the first is the unpruned count (e.g. 2880,160)")
    p.add_argument("--text", type=int, default=32, help="text tokens (default 32, as in the papers)")
    p.add_argument("--schedule", type=parse_schedule, default=[],
                   help="in-LLM pruning of the first --visual count: LAYER:TOKENS[,LAYER:TOKENS] (e.g. 2:64 = FastV K=2)")
    p.add_argument("--full-visual", type=int, default=None,
                   help="unpruned visual tokens the vision tower produces (default: max of --visual and the model's native count)")
    p.add_argument("--grid", type=_parse_grid, default=None,
                   help="Qwen only: image grid in patches, HxW or TxHxW (default: squarest grid for the first --visual)")
    p.add_argument("--method-flops", type=float, default=0.0, help="pruning method's own FLOPs, added to the exact total")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV element (2 = fp16/bf16)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Print the FLOPs/KV table for ``args`` (from :func:`add_cli`); returns the exit code
    (2, with the reason on stderr, for an unknown model or a bad budget/schedule).
    """
    try:
        return _run(args)
    except (VTPruneError, ValueError) as e:
        print(f"vtprune flops: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from ..presets import list_presets

    if args.list:
        print("\n".join(list_presets()))
        return 0
    cfg = _as_config(args.model)
    visuals = args.visual
    full = args.full_visual or default_full_visual_tokens(cfg, max(visuals))
    rows = [_row(cfg, v, args, full, []) for v in visuals]
    if args.schedule:
        rows.append(_row(cfg, visuals[0], args, full, list(args.schedule)))
    base = rows[0]
    headers = ["visual", "n", "paper TFLOPs", "% of first", "exact LLM TFLOPs", "exact total TFLOPs", "KV MiB"]
    table = [
        [r.label, "->".join(str(v + args.text) for v in [r.visual_tokens] + [t for _, t in r.schedule]), f"{r.paper_tflops:.2f}",
         f"{100 * r.paper_tflops / base.paper_tflops:.1f}", f"{r.exact_llm_tflops:.2f}",
         f"{r.exact_total_tflops:.2f}", f"{r.kv_mib:.1f}"]
        for r in rows
    ]
    s = lm_shape(cfg)
    print(f"model: {args.model} ({_family(cfg)}; LLM {s.layers} layers, d={s.hidden}, ffn={s.ffn}, "
          f"heads={s.heads}, kv_heads={s.kv_heads}); text tokens {args.text}; vision tower at {full} visual tokens")
    print(format_table(headers, table))
    print("paper: FastV formula 2·(4nd² + 2n²d + 2ndm) per layer, LLM only. exact: GQA projections, full n² "
          "attention, 3 SwiGLU matrices, lm_head on the last token, vision tower, projector"
          + (", method" if args.method_flops else "") + f". KV: {args.dtype_bytes} bytes/element, visual + text "
          "tokens, each layer holding the tokens it saw (schedule rows: early layers keep their unpruned KV).")
    extra: dict[str, Any] = {}
    if args.schedule:
        stages = flops_stages(cfg, visuals[0], args.text, args.schedule)
        print("\nschedule stages:")
        print(format_table(
            ["layers", "visual", "paper TFLOPs", "exact TFLOPs"],
            [[f"{st['first_layer']}-{st['last_layer']}", str(st["visual_tokens"]), f"{st['paper_flops'] / 1e12:.3f}",
              f"{st['exact_flops'] / 1e12:.3f}"] for st in stages],
        ))
        eq = equivalent_visual_tokens(cfg, visuals[0], args.schedule, args.text)
        print(f"equivalent visual tokens: layer average {eq['layer_average']:.1f}, "
              f"FLOPs-matched {eq['flops_matched']:.1f}; KV with early layers compacted "
              f"{rows[-1].kv_compacted_mib:.1f} MiB")
        extra = {"stages": stages, "equivalent_visual_tokens": eq}
    if args.json:
        payload = {"model": str(args.model), "text_tokens": args.text, "full_visual_tokens": full,
                   "rows": [asdict(r) for r in rows], **extra}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m vtprune.bench.flops --model llava-1.5-7b --visual 576,64``."""
    parser = argparse.ArgumentParser(prog="vtprune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(["flops", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
