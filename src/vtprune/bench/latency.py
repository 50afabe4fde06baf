"""``vtprune bench``: prefill / decode latency, memory and KV-cache size, unpruned and per method × budget.

What is measured, for the unmodified model and for every method × budget (median and spread over
``--repeats`` runs after ``--warmup`` runs, GPU work synchronised before every clock read):

* **prefill** — time to first token: one forward of the whole prompt with ``use_cache=True`` and
  ``logits_to_keep=1`` (as ``generate`` does), the vision tower and the pruning method included;
* **decode** — per generated token: ``generate(max_new_tokens=N, min_new_tokens=N)`` with a stopping
  criterion that stamps the clock after every step; ``(last stamp - first stamp) / (N - 1)``;
* **peak memory** — GPU: ``torch.cuda.max_memory_allocated`` over the prefill (absolute, weights
  included, and the rise above the memory held before the call); CPU: the rise of the process's peak
  resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), or ``n/a`` where the
  kernel does not allow the reset; ``memory_kind`` in the JSON says which;
* **KV cache** — bytes of the key/value tensors the prefill returned, next to
  :func:`vtprune.bench.flops.kv_cache_bytes` for the cache length (kept visual + text tokens);
* **method time** — ``handle.stats[-1].method_seconds``; **tokens** — visual tokens per image that
  entered the LLM, that remained after every stage, and the layer-averaged count;
* **physical limit** — the unmodified model's vision side alone (tower + projector,
  ``get_image_features``) plus its language model's prefill on ``inputs_embeds`` at the pruned
  sequence length with no method; each prefill is also given as a ratio to that limit.

Inputs are synthetic but shaped like the processor's output (``vtprune.tiny.make_inputs``): a BOS
token, the image placeholders expanded to the model's real count, and ``--prompt-tokens`` text tokens.
Speed depends on shapes, not on weight values, so ``--random-weights PRESET`` (the full-size
architecture from :mod:`vtprune.presets` with random weights) times like the released checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import VTPruneError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: default image size (H, W) in pixels: full-size models (LLaVA-NeXT: 5 crops; Qwen: 24×24 merged tokens)
FULL_IMAGE_SIZE = (672, 672)


class BenchError(VTPruneError, ValueError):
    """A benchmark option that cannot work (unknown preset, bad size, nothing to run)."""


# --------------------------------------------------------------------------------------------------
# model


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but torch sees no CUDA device (torch "
                         f"{torch.__version__}); use --device cpu")
    return dev


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def build_model(*, tiny: str | None = None, random_weights: str | None = None, model_path: str | None = None,
                device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa", seed: int = 0):
    """The model to time, in eval mode on ``device`` in ``dtype``, and a one-line description.

    Exactly one of ``tiny`` (a family of :mod:`vtprune.tiny`), ``random_weights`` (a preset name, Hub id
    of a preset, or a local config path: the full architecture with random weights, built directly on
    the device) or ``model_path`` (a local checkpoint, ``from_pretrained``) must be given.
    """
    if sum(x is not None for x in (tiny, random_weights, model_path)) != 1:
        raise BenchError("give exactly one of --model PATH, --random-weights PRESET, --tiny FAMILY")
    if tiny is not None:
        from ..tiny import FAMILIES, tiny_model

        if tiny not in FAMILIES:
            raise BenchError(f"unknown tiny family {tiny!r}; choose one of {', '.join(FAMILIES)}")
        model = tiny_model(tiny, seed=seed, attn_implementation=attn_implementation).to(device=device, dtype=dtype)
        return model.eval(), f"tiny {tiny} (random weights)"
    if random_weights is not None:
        import transformers

        from ..presets import load_config

        try:
            cfg = load_config(random_weights)
        except KeyError as e:  # UnknownPresetError
            raise BenchError(str(e)) from None
        name = hf_class_name(cfg.model_type)
        torch.manual_seed(seed)
        with torch.device(device):  # weights are created (and initialised) on the device directly
            model = getattr(transformers, name)._from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
        return model.eval(), f"{random_weights} (random weights, {name})"
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype,
                                                        attn_implementation=attn_implementation)
    return model.to(device).eval(), f"{model_path} ({type(model).__name__})"


# --------------------------------------------------------------------------------------------------
# synthetic, processor-shaped inputs


def _special_ids(cfg) -> set[int]:
    tc = cfg.get_text_config()
    ids = set()
    for obj in (cfg, tc):
        for key in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(obj, key, None)
            for x in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(x, int):
                    ids.add(x)
    return ids


def _text_ids(cfg, n: int, seed: int) -> list[int]:
    vocab = cfg.get_text_config().vocab_size
    special = _special_ids(cfg)
    lo, hi = (8, vocab) if vocab < 1000 else (100, min(vocab, 30000))
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in torch.randint(lo, hi, (n,), generator=g).tolist():
        while x in special:
            x = lo + (x + 1 - lo) % (hi - lo)
        out.append(x)
    return out


def hf_class_name(model_type: str) -> str:
    """The transformers class that builds a model of ``model_type`` (from the family declarations)."""
    from ..models.families import all_families

    for fam in all_families():
        if model_type in fam.model_types:
            return fam.hf_classes[0]
    known = ", ".join(t for f in all_families() for t in f.model_types)
    raise BenchError(f"model_type {model_type!r} is not a supported VLM family ({known})")


def resolve_image_size(model, family: str, image_size: tuple[int, int] | None, tiny: bool) -> tuple[int, int]:
    """The image size (H, W) the inputs use. A single fixed-size crop (LLaVA-1.5) always uses its tower's
    square; merged-patch towers (Qwen) round sizes down to whole merged tokens (multiples of patch × merge).
    Tiny models default to their family's ``tiny.image_size``."""
    from ..models.families import get

    cfg, fam = model.config, get(family)
    if not fam.anyres and fam.merge_factor == 1:  # one crop at the tower's own input size
        side = cfg.vision_config.image_size
        return side, side
    size = image_size or (fam.tiny.image_size if tiny else FULL_IMAGE_SIZE)
    if fam.merge_factor > 1:
        unit = cfg.vision_config.patch_size * cfg.vision_config.spatial_merge_size
        size = tuple(max(unit, (s // unit) * unit) for s in size)
    return int(size[0]), int(size[1])


def synthetic_inputs(model, *, batch_size: int = 1, image_size: tuple[int, int], prompt_tokens: int = 32,
                     seed: int = 0, device: torch.device | None = None) -> dict:
    """Processor-shaped inputs: per sample ``[BOS] <image placeholders> <prompt_tokens text ids>`` with
    one image of ``image_size`` (H, W); every sample has the same length (no padding). Built with
    :func:`vtprune.tiny.make_inputs`, which derives the placeholder count from the config exactly as the
    processors do (LLaVA-1.5: 576; LLaVA-NeXT: base + AnyRes crops, unpadded, one newline per row;
    Qwen: (H/28)·(W/28) merged tokens between vision start/end markers)."""
    from ..tiny import Sample, make_inputs

    cfg = model.config
    tc = cfg.get_text_config()
    bos = tc.bos_token_id if isinstance(tc.bos_token_id, int) else 1
    after = _text_ids(cfg, prompt_tokens, seed)
    samples = [Sample(before=[bos], after=after, image_seed=seed + i, size=tuple(image_size)) for i in range(batch_size)]
    pad = tc.pad_token_id if isinstance(tc.pad_token_id, int) else 0
    inputs = make_inputs(model, samples, pad_token_id=pad)
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    return {k: (v.to(device=device, dtype=dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}


def _image_token_id(cfg) -> int:
    return cfg.image_token_id if getattr(cfg, "image_token_id", None) is not None else cfg.image_token_index


def _vision_kwargs(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("pixel_values", "image_sizes", "image_grid_thw") if k in inputs}


# --------------------------------------------------------------------------------------------------
# measurement primitives


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles (inclusive method), min, max and the raw values."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "p25": None, "p75": None, "min": None, "max": None, "values": []}
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {"median": statistics.median(vals), "p25": q1, "p75": q3, "min": min(vals), "max": max(vals),
            "values": vals}


class MemoryMeter:
    """Peak memory of a block: CUDA allocator peak on GPU; peak-RSS rise on CPU (Linux), else n/a."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif self._reset_rss_peak():
            self.kind = "cpu_peak_rss_delta"
        else:
            self.kind = "n/a"

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _reset_rss_peak(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        hwm, rss = self._status("VmHWM"), self._status("VmRSS")
        return hwm is not None and rss is not None and hwm <= rss + (64 << 20)

    @contextlib.contextmanager
    def measure(self, out: dict):
        """Fills ``out`` with ``peak_bytes`` (absolute; None on CPU) and ``peak_delta_bytes``."""
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            out.update(peak_bytes=int(peak), peak_delta_bytes=int(peak - base))
        elif self.kind == "cpu_peak_rss_delta":
            self._reset_rss_peak()
            base = self._status("VmRSS") or 0
            yield
            peak = self._status("VmHWM") or 0
            out.update(peak_bytes=None, peak_delta_bytes=int(max(0, peak - base)))
        else:
            yield
            out.update(peak_bytes=None, peak_delta_bytes=None)


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes, sequence length) of the key/value tensors held by a transformers cache."""
    total, length = 0, 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(l, "keys", None), getattr(l, "values", None)) for l in layers]
    else:  # legacy tuple of (k, v)
        pairs = [tuple(p[:2]) for p in cache]
    for k, v in pairs:
        for t in (k, v):
            if isinstance(t, torch.Tensor) and t.numel():
                total += t.numel() * t.element_size()
                length = max(length, t.shape[-2])
    return total, length


class _Stamps:
    """A stopping criterion that never stops; it records the (synchronised) clock after each step."""

    def __init__(self, device: torch.device):
        from transformers import StoppingCriteria

        stamps = self.stamps = []

        class _Crit(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                _sync(device)
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.criterion = _Crit()


def time_prefill(model, inputs: dict, device: torch.device, meter: MemoryMeter):
    """One prefill: (seconds, output, memory dict)."""
    mem: dict = {}
    with torch.no_grad(), meter.measure(mem):
        _sync(device)
        start = time.perf_counter()
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        _sync(device)
        seconds = time.perf_counter() - start
    return seconds, out, mem


def time_generate(model, inputs: dict, new_tokens: int, device: torch.device) -> dict:
    """``generate`` exactly ``new_tokens`` greedy tokens: time to first token and per decode step."""
    stamps = _Stamps(device)
    pad = model.config.get_text_config().pad_token_id
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=[stamps.criterion], pad_token_id=pad if isinstance(pad, int) else 0)
        _sync(device)
        end = time.perf_counter()
    s = stamps.stamps
    decode = (s[-1] - s[0]) / (len(s) - 1) if len(s) >= 2 else None
    return {"ttft": (s[0] - start) if s else None, "decode_per_token": decode, "total": end - start, "steps": len(s)}


def _repeat(fn, warmup: int, repeats: int, device: torch.device) -> list[float]:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - start)
    return out


def vision_alone_seconds(model, inputs: dict, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """The unmodified model's vision side (tower + projector) on the images of ``inputs``."""
    kwargs = _vision_kwargs(inputs)
    return _repeat(lambda: model.model.get_image_features(**kwargs), warmup, repeats, device)


def llm_alone_seconds(model, batch: int, length: int, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """The unmodified language model's prefill on random ``inputs_embeds`` of ``length`` tokens
    (cache on, lm_head on the last token, as in a prefill)."""
    lm = model.model.language_model
    head = model.get_output_embeddings()
    tc = model.config.get_text_config()
    dtype = next(model.parameters()).dtype
    g = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(batch, length, tc.hidden_size, generator=g, device=device, dtype=dtype) * 0.02
    mask = torch.ones(batch, length, dtype=torch.long, device=device)

    def run():
        out = lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        head(out.last_hidden_state[:, -1:])

    return _repeat(run, warmup, repeats, device)


# --------------------------------------------------------------------------------------------------
# the benchmark


def method_takes_budget(name: str) -> bool:
    """Whether the registered method ``name`` takes ``keep=`` (a fixed budget)."""
    from ..methods.base import method_class

    return "keep" in inspect.signature(method_class(name).__init__).parameters


def parse_method_args(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["fastv:layer=3", "pyramiddrop:layers=1,2,3,keep=4"]`` -> ``{"fastv": {"layer": 3}, ...}``.
    Values are read as by every other command (``vtprune.cli.arguments.parse_value``); a comma followed by a piece
    without ``=`` continues the previous value as a tuple."""
    from ..cli.arguments import parse_value

    out: dict[str, dict[str, Any]] = {}
    for item in items or ():
        name, sep, rest = item.partition(":")
        if not sep or not name or not rest:
            raise BenchError(f"--method-args {item!r} must look like METHOD:KEY=VALUE[,KEY=VALUE] (e.g. fastv:layer=3)")
        pairs: list[list[str]] = []
        for piece in rest.split(","):
            key, eq, value = piece.partition("=")
            if eq and key:
                pairs.append([key.strip(), value])
            elif pairs and not eq:
                pairs[-1][1] += "," + piece
            else:
                raise BenchError(f"--method-args {item!r}: {piece!r} must look like KEY=VALUE")
        for key, value in pairs:
            out.setdefault(name.strip(), {})[key.replace("-", "_")] = parse_value(value)
    return out


def _mean(xs: Sequence[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _token_counts(stats, num_layers: int, batch: int) -> dict[str, Any]:
    """Per-image visual-token counts of one pruned prefill (the batch is ``batch`` identical-shape samples)."""
    per_image_final = [len(im.kept_cells) for im in stats.images]  # prunable patches left after all stages
    per_sample_visual = [len(cols) for cols in stats.kept_columns]  # every visual token left (newlines incl.)
    return {
        "per_sample_visual_final": per_sample_visual,
        "tokens_entering_llm": _mean(stats.tokens_entering_llm),
        "tokens_layer_averaged": _mean(stats.layer_averaged(num_layers)),
        "patches_kept": _mean(per_image_final),
        "visual_tokens_final": _mean(per_sample_visual),
        "per_image_entering": list(stats.tokens_entering_llm),
        "per_image_patches_kept": per_image_final,
    }


@contextlib.contextmanager
def gc_paused():
    """Collect once, then keep Python's cyclic GC from pausing inside the timed runs."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _run_config(model, inputs, **kwargs) -> dict:
    with gc_paused():
        return _measure_config(model, inputs, **kwargs)


def _measure_config(model, inputs, *, handle, label: dict, warmup: int, repeats: int, new_tokens: int,
                    device: torch.device, meter: MemoryMeter, text_tokens: int, full_visual: int) -> dict:
    from .._compat import output_cache
    from .flops import kv_cache_bytes

    num_layers = model.config.get_text_config().num_hidden_layers
    batch = inputs["input_ids"].shape[0]
    prefill, method_s, total_s, peaks, deltas, ttft, decode, gen_total = [], [], [], [], [], [], [], []
    kv_measured, cache_len, counts = None, None, None
    for i in range(warmup + repeats):
        if handle is not None:
            handle.reset_stats()
        seconds, out, mem = time_prefill(model, inputs, device, meter)
        kv, length = cache_bytes(output_cache(out))
        del out
        st = handle.stats[-1] if handle is not None and handle.stats else None
        gen = time_generate(model, inputs, new_tokens, device) if new_tokens > 0 else None
        if i < warmup:
            continue
        prefill.append(seconds)
        peaks.append(mem.get("peak_bytes"))
        deltas.append(mem.get("peak_delta_bytes"))
        kv_measured, cache_len = kv, length
        if st is not None:
            method_s.append(st.method_seconds)
            total_s.append(st.total_seconds)
            counts = _token_counts(st, num_layers, batch)
        if gen is not None:
            ttft.append(gen["ttft"])
            if gen["decode_per_token"] is not None:
                decode.append(gen["decode_per_token"])
            gen_total.append(gen["total"])
    if counts is None:  # the unmodified model: every placeholder enters every layer
        counts = {"tokens_entering_llm": float(full_visual), "tokens_layer_averaged": float(full_visual),
                  "patches_kept": None, "visual_tokens_final": float(full_visual),
                  "per_image_entering": [full_visual] * batch, "per_image_patches_kept": [],
                  "per_sample_visual_final": [full_visual] * batch}
    elem = next(model.parameters()).element_size()
    formula = batch * kv_cache_bytes(model.config, cache_len, dtype_bytes=elem)
    expected_len = text_tokens + max(counts["per_sample_visual_final"])  # left padding: the longest sample
    valid_peaks = [p for p in peaks if p is not None]
    valid_deltas = [d for d in deltas if d is not None]
    return {
        **label,
        "status": "ok",
        **{k: v for k, v in counts.items()},
        "cache_tokens": cache_len,
        "expected_cache_tokens": expected_len,
        "kv_bytes_measured": kv_measured,
        "kv_bytes_formula": formula,
        "kv_bytes_formula_expected_tokens": batch * kv_cache_bytes(model.config, expected_len, dtype_bytes=elem),
        "kv_matches_formula": kv_measured == formula and cache_len == expected_len,
        "prefill_s": summarize(prefill),
        "method_s": summarize(method_s),
        "pipeline_total_s": summarize(total_s),
        "generate_ttft_s": summarize([t for t in ttft if t is not None]),
        "decode_per_token_s": summarize(decode),
        "generate_total_s": summarize(gen_total),
        "peak_memory_bytes": max(valid_peaks) if valid_peaks else None,
        "peak_memory_delta_bytes": max(valid_deltas) if valid_deltas else None,
    }


def run_benchmark(model, *, methods: Sequence[str], budgets: Sequence[int], inputs: dict,
                  method_args: dict[str, dict] | None = None, warmup: int = 2, repeats: int = 10,
                  new_tokens: int = 16, layout: str = "model", progress=None) -> dict:
    """Time the unmodified model and every method × budget on ``inputs``; returns the raw results
    (the ``rows`` list holds one dict per configuration; see the module docstring)."""
    import vtprune
    from ..models import families, family_of

    method_args = method_args or {}
    device = next(model.parameters()).device
    family = family_of(model)
    layouts = len(families.get(family).layouts) > 1  # the family takes apply(layout=...)
    cfg = model.config
    meter = MemoryMeter(device)
    ids = inputs["input_ids"]
    batch, seq_len = ids.shape
    full_visual = int((ids[0] == _image_token_id(cfg)).sum())
    text_tokens = seq_len - full_visual
    say = progress or (lambda msg: None)
    common = dict(warmup=warmup, repeats=repeats, new_tokens=new_tokens, device=device, meter=meter,
                  text_tokens=text_tokens, full_visual=full_visual)

    rows = []
    say(f"unpruned: {full_visual} visual + {text_tokens} text tokens")
    rows.append(_run_config(model, inputs, handle=None, label={"method": "none", "budget": None, "args": {},
                                                                 "fixed_budget": False},
                            **common))
    for name in methods:
        extra = dict(method_args.get(name, {}))
        fixed = method_takes_budget(name)
        plan = [(b, {**extra, "keep": b}) for b in budgets] if fixed and "keep" not in extra and "ratio" not in extra \
            else [(extra.get("keep"), extra)]
        for budget, kwargs in plan:
            label = {"method": name, "budget": budget, "args": kwargs, "fixed_budget": fixed}
            options = {"layout": layout} if layouts else {}
            say(f"{name} {kwargs}")
            try:
                handle = vtprune.apply(model, name, **options, **kwargs)
            except (VTPruneError, TypeError, ValueError) as e:
                rows.append({**label, "status": "error", "error": f"{type(e).__name__}: {e}"})
                continue
            try:
                rows.append(_run_config(model, inputs, handle=handle, label=label, **common))
            except (VTPruneError, torch.cuda.OutOfMemoryError) as e:  # e.g. a budget not below the image's tokens
                rows.append({**label, "status": "error", "error": f"{type(e).__name__}: {e}"})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            finally:
                handle.remove()

    # physical limit: vision side alone + LLM prefill at each row's cache length, no method
    say("limit: vision side alone and the LLM alone at each pruned length")
    with gc_paused():
        vision = summarize(vision_alone_seconds(model, inputs, warmup, repeats, device))
    llm: dict[int, dict] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        n = row["cache_tokens"]
        if n not in llm:
            with gc_paused():
                llm[n] = summarize(llm_alone_seconds(model, batch, n, warmup, repeats, device))
        row["limit_llm_s"] = llm[n]["median"]
        row["limit_s"] = vision["median"] + llm[n]["median"]
        row["prefill_over_limit"] = row["prefill_s"]["median"] / row["limit_s"]
    base = rows[0]["prefill_s"]["median"]
    for row in rows:
        if row["status"] == "ok":
            row["speedup_vs_unpruned"] = base / row["prefill_s"]["median"]
    return {
        "family": family,
        "layout": layout if layouts else None,
        "batch_size": batch,
        "sequence_tokens": seq_len,
        "visual_tokens_full": full_visual,
        "text_tokens": text_tokens,
        "num_layers": cfg.get_text_config().num_hidden_layers,
        "memory_kind": meter.kind,
        "vision_alone_s": vision,
        "llm_alone_s": {str(k): v for k, v in sorted(llm.items())},
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------
# reporting


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    from .. import __version__

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vtprune": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    else:
        info["device"] = cpu_name()
    return info


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _ms(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x * 1e3:.{digits}f}"


def _tok(x: float | None) -> str:
    if x is None:
        return "-"
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _mib(x: int | None) -> str:
    if x is None:
        return "n/a"
    mib = x / 2**20
    return f"{mib:.1f}" if mib >= 10 else f"{mib:.3g}"


TABLE_HEADERS = ["method", "budget", "entering", "kept", "final", "layer-avg", "seq", "prefill ms", "IQR ms",
                 "x full", "limit ms", "/limit", "decode ms/tok", "method ms", "peak MiB", "peak rise MiB",
                 "KV MiB", "KV=formula"]


def table_rows(result: dict) -> list[list[str]]:
    """One row of strings per configuration that ran (skipped ones are in :func:`skipped_lines`)."""
    rows = []
    for r in result["rows"]:
        if r["status"] != "ok":
            continue
        p = r["prefill_s"]
        rows.append([
            r["method"], "-" if r.get("budget") is None else str(r["budget"]), _tok(r["tokens_entering_llm"]),
            _tok(r["patches_kept"]), _tok(r["visual_tokens_final"]), _tok(r["tokens_layer_averaged"]),
            str(r["cache_tokens"]), _ms(p["median"]), f"{_ms(p['p25'])}-{_ms(p['p75'])}",
            f"{r['speedup_vs_unpruned']:.2f}", _ms(r["limit_s"]), f"{r['prefill_over_limit']:.2f}",
            _ms(r["decode_per_token_s"]["median"]),
            _ms(r["method_s"]["median"], 3) if r["method"] != "none" else "-",
            _mib(r["peak_memory_bytes"]), _mib(r["peak_memory_delta_bytes"]),
            _mib(r["kv_bytes_measured"]), "yes" if r["kv_matches_formula"] else "NO",
        ])
    return rows


def skipped_lines(result: dict) -> list[str]:
    return [f"skipped {r['method']} {r.get('args') or ''}: {r['error']}" for r in result["rows"] if r["status"] != "ok"]


TABLE_NOTES = (
    "entering: visual tokens per image entering the LLM; kept: image patches left after every stage; final: "
    "visual tokens left in the sequence (LLaVA-NeXT model layout: newline tokens included); layer-avg: averaged "
    "over the decoder layers; seq: cache length (visual + text). prefill: median over repeats, IQR = 25th-75th "
    "percentile; x full: unpruned prefill / this prefill; limit: vision side alone + the unmodified LLM's prefill "
    "at this seq length; /limit: prefill / limit; peak rise: peak above the memory held before the prefill; "
    "KV=formula: measured cache bytes == 2*layers*kv_heads*head_dim*seq*bytes*batch."
)


def _header_lines(payload: dict) -> list[str]:
    env, res, args = payload["environment"], payload["result"], payload["args"]
    mem = {"cuda_max_memory_allocated": "peak MiB = torch.cuda.max_memory_allocated during the prefill (weights "
                                        "included)",
           "cpu_peak_rss_delta": "peak memory on CPU: peak rise = rise of the process's peak RSS (VmHWM) during the "
                                 "prefill; no absolute peak",
           "n/a": "peak memory n/a on this platform"}[res["memory_kind"]]
    layout = f", layout {res['layout']}" if res.get("layout") else ""
    return [
        f"model: {payload['model']}; {res['family']}{layout}; dtype {args['dtype']}; attention {args['attn']}",
        f"device: {env['device']} ({env['device_type']}); torch {env['torch']}, transformers {env['transformers']}; "
        f"{env['date']}",
        f"inputs: batch {res['batch_size']}, {res['visual_tokens_full']} visual + {res['text_tokens']} text tokens "
        f"({res['sequence_tokens']}), image {args['image_size']}; warmup {args['warmup']}, repeats {args['repeats']}, "
        f"{args['new_tokens']} new tokens; {env['cpu_threads']} CPU threads",
        f"vision side alone {_ms(res['vision_alone_s']['median'])} ms; {mem}",
    ]


def format_report(payload: dict) -> str:
    """The plain-text report: header lines, the aligned table, skipped configurations, notes."""
    from .flops import format_table

    res = payload["result"]
    return "\n".join(_header_lines(payload) + [format_table(TABLE_HEADERS, table_rows(res))]
                     + skipped_lines(res) + [TABLE_NOTES])


def format_markdown(payload: dict) -> str:
    """The report as markdown: header as a bullet list, the table, skipped configurations, notes."""
    res = payload["result"]
    lines = ["- " + line for line in _header_lines(payload)]
    lines += ["", "| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(res)]
    lines += [""] + [f"- {line}" for line in skipped_lines(res)] + ["", TABLE_NOTES]
    return "\n".join(lines) + "\n"


def write_png(payload: dict, path: str | Path) -> Path:
    """Prefill time against visual tokens kept (after all stages), one line per method, the unpruned
    point, and the physical-limit curve (vision side alone + LLM alone at that length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = payload["result"]
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    by_method: dict[str, list] = {}
    for r in ok:
        if r["method"] != "none":
            by_method.setdefault(r["method"], []).append((r["visual_tokens_final"], r["prefill_s"]["median"] * 1e3))
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*"
    for i, (name, pts) in enumerate(sorted(by_method.items())):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], label=name)
    limit = sorted({(r["visual_tokens_final"], r["limit_s"] * 1e3) for r in ok})
    if limit:
        ax.plot([p[0] for p in limit], [p[1] for p in limit], "k--", marker="x", label="limit (vision + LLM alone)")
    full = [r for r in ok if r["method"] == "none"]
    if full:
        ax.scatter([full[0]["visual_tokens_final"]], [full[0]["prefill_s"]["median"] * 1e3], marker="*", s=160,
                   color="red", zorder=5, label="unpruned")
    ax.set_xlabel("visual tokens in the LLM after all stages (per image)")
    ax.set_ylabel("prefill (ms, median)")
    env = payload["environment"]
    ax.set_title(f"{payload['model']} — {env['device']}, batch {res['batch_size']}", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# CLI


def _parse_ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return vals


def _parse_names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels (e.g. 672x672), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return h, w


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local checkpoint directory (from_pretrained)")
    src.add_argument("--random-weights", metavar="PRESET",
                     help="full-size architecture of a preset (e.g. llava-next-7b, llava-1.5-7b) with random weights")
    src.add_argument("--tiny", metavar="FAMILY", help="a tiny model (llava, llava_next, qwen2_5_vl, qwen3_vl) for CPU smoke runs")
    p.add_argument("--methods", type=_parse_names, default=["fastv", "cls_topk"],
                   help="comma-separated methods (default fastv,cls_topk; see `vtprune methods`)")
    p.add_argument("--budgets", type=_parse_ints, default=[192, 128, 64, 32],
                   help="visual tokens kept per image, for methods taking keep= (default 192,128,64,32)")
    p.add_argument("--method-args", action="append", default=[], metavar="METHOD:KEY=VALUE[,KEY=VALUE]",
                   help="extra arguments of one method, repeatable (e.g. fastv:layer=3); a method that takes no "
                        "keep= (adaptive) runs once with these")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated for the decode timing (0: skip)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="text tokens after the image (default 32)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default cuda when available)")
    p.add_argument("--attn", default="sdpa", help="attention implementation (default sdpa)")
    p.add_argument("--image-size", type=_parse_size, default=None,
                   help="image HxW in pixels (LLaVA-NeXT, Qwen; default 672x672, tiny models 56x56 / 112x112)")
    p.add_argument("--layout", choices=("model", "flat"), default="model",
                   help="LLaVA-NeXT token layout of pruned runs (default model: unpadded + newlines)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads while the benchmark runs (default: torch's; 1 steadies CPU timings on a busy machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all raw numbers and the environment here")
    p.add_argument("--png", default=None, help="write the prefill-vs-tokens plot here")
    p.add_argument("--markdown", default=None, help="write the table as markdown (with device and date) here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an argparse ``subparsers`` object; it calls :func:`run_cli`."""
    p = subparsers.add_parser("bench", help="prefill/decode latency, memory and KV cache, unpruned and per method × budget",
                              description=(__doc__ or "").split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (from :func:`add_cli`); returns the exit code (2, with
    the reason on stderr, for an unusable option)."""
    try:
        payload = run_from_args(args)
    except (VTPruneError, ValueError, KeyError) as e:
        print(f"vtprune bench: error: {e}", file=sys.stderr)
        return 2
    return 0 if payload["result"]["rows"] and payload["result"]["rows"][0]["status"] == "ok" else 1


def run_from_args(args: argparse.Namespace) -> dict:
    """Build the model and inputs, run, print the table and write the requested files; returns the payload."""
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return _run_from_args(args)
    finally:
        torch.set_num_threads(threads)


def _run_from_args(args: argparse.Namespace) -> dict:
    from ..methods.base import method_class
    from ..models import family_of

    for name in args.methods:
        method_class(name)  # unknown names fail before the model is built
    method_args = parse_method_args(args.method_args)
    unknown = set(method_args) - set(args.methods)
    if unknown:
        raise BenchError(f"--method-args for {', '.join(sorted(unknown))}, which is not in --methods")
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.new_tokens < 0 or args.prompt_tokens < 1:
        raise BenchError("need --repeats >= 1, --warmup >= 0, --batch-size >= 1, --new-tokens >= 0, --prompt-tokens >= 1")
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    say(f"building the model on {device} ({str(dtype).replace('torch.', '')})")
    model, description = build_model(tiny=args.tiny, random_weights=args.random_weights, model_path=args.model,
                                     device=device, dtype=dtype, attn_implementation=args.attn, seed=args.seed)
    family = family_of(model)
    size = resolve_image_size(model, family, args.image_size, tiny=args.tiny is not None)
    inputs = synthetic_inputs(model, batch_size=args.batch_size, image_size=size, prompt_tokens=args.prompt_tokens,
                              seed=args.seed, device=device)
    result = run_benchmark(model, methods=args.methods, budgets=args.budgets, inputs=inputs, method_args=method_args,
                           warmup=args.warmup, repeats=args.repeats, new_tokens=args.new_tokens, layout=args.layout,
                           progress=say)
    payload = {
        "model": description,
        "environment": environment(device),
        "argv": list(getattr(args, "_argv", None) or sys.argv[1:]),
        "args": {"methods": args.methods, "budgets": args.budgets, "method_args": method_args,
                 "batch_size": args.batch_size, "warmup": args.warmup, "repeats": args.repeats,
                 "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
                 "dtype": str(dtype).replace("torch.", ""), "attn": args.attn, "image_size": f"{size[0]}x{size[1]}",
                 "layout": args.layout, "seed": args.seed, "threads": torch.get_num_threads()},
        "result": result,
    }
    print(format_report(payload))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
        print(f"wrote {path}")
    if args.markdown:
        path = Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(format_markdown(payload))
        print(f"wrote {path}")
    if args.png:
        print(f"wrote {write_png(payload, args.png)}")
    return payload


def _json_default(obj: Any):
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m vtprune.bench.latency --tiny llava --budgets 8,4``
    (the arguments of ``vtprune bench``)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    args = build_parser().parse_args(["bench", *argv])
    args._argv = argv
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
