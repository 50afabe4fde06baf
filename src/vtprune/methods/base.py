"""The contract every pruning method follows.

A method is pure tensor logic. It declares the insertion point(s) it works at (:class:`Stage`) and
receives a context object per image (vision / projected stages) or per sample (LLM stage) whose
properties are computed lazily by the model adapter: a method that never touches
``ctx.cls_attention`` never pays for it. It returns a :class:`Selection`: sorted indices of the
candidate tokens to keep, optionally with replacement values (token merging).
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar

import torch

from ..errors import ArgumentError, BudgetError, UnknownMethodError, UnsupportedMethodError
from .arguments import validated


class Stage(str, Enum):
    VISION = "vision"  # after the vision encoder, before the projector (per image / per crop)
    PROJECTED = "projected"  # after the projector, before the LLM
    LLM = "llm"  # inside the decoder, from a given layer on


@dataclass
class Selection:
    """What a method keeps of one image's (or one sample's) candidate tokens.

    keep:   int64 indices into the candidates, sorted ascending, unique (on the device the method
            computed them on; the caller moves them where it needs them).
    values: optional (len(keep), D) replacement features for the kept tokens (merging methods);
            ``None`` means the kept tokens keep their own features.
    info:   free-form per-image statistics (thresholds, scores) that end up in the stats. Values a
            method computes on the device stay tensors there (reading one back to the host would
            stall the GPU in the middle of the prefill); whoever reads them converts them
            (``.tolist()``, ``float(...)``).
    """

    keep: torch.Tensor
    values: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.keep, torch.Tensor) and self.keep.dtype == torch.long and self.keep.dim() == 1):
            self.keep = torch.as_tensor(self.keep, dtype=torch.long).flatten()
        if self.values is not None and self.values.shape[0] != self.keep.numel():
            raise ValueError(
                f"Selection.values has {self.values.shape[0]} rows for {self.keep.numel()} kept tokens"
            )
        if self.keep.numel() < 2:
            return
        if self.keep.device.type == "cpu":  # asking costs nothing here: sort only if needed, refuse duplicates
            host = self.keep.numpy()  # cpu only: a view, no device to wait for (numpy: cheaper on small arrays)
            if (host[1:] > host[:-1]).all():
                return
            if torch.unique(self.keep).numel() != self.keep.numel():  # cpu only: no device to wait for
                raise ValueError("Selection.keep holds duplicate indices")
        # on an accelerator asking whether keep is sorted would read a value back: always sort (a no-op
        # order on sorted input; duplicates are not checked there)
        self.keep, order = torch.sort(self.keep)
        if self.values is not None:
            self.values = self.values[order]


def sorted_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties broken by lower index, returned in ascending order."""
    n = scores.numel()
    # a tiny index-dependent offset would change values; use a stable sort instead
    order = torch.sort(scores.float().flatten(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values if k < n else torch.arange(n, device=scores.device)


def mask_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the True entries of the 1-d bool ``mask``, which the caller knows to hold
    exactly ``count`` of them. Unlike ``torch.nonzero`` / ``x[mask]`` it needs no host
    synchronisation: the output size is known without reading the mask back."""
    return torch.sort((~mask).to(torch.uint8), stable=True).indices[:count]


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``. A host→accelerator copy is queued without waiting for the stream
    (``non_blocking``; the driver stages pageable memory before returning, so ``t`` may be freed at
    once); other moves are plain ``.to``."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type != "cpu":
        return t.to(device, non_blocking=True)
    return t.to(device)


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over groups of ``sizes`` proportionally (largest remainder, ties to the first
    group), never more than a group holds."""
    whole = sum(sizes)
    shares = [total * s / whole for s in sizes]
    out = [min(int(x), s) for x, s in zip(shares, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - int(shares[i])), i))
    i = 0
    while sum(out) < total and i < 10 * len(sizes):
        j = order[i % len(sizes)]
        if out[j] < sizes[j]:
            out[j] += 1
        i += 1
    return out


class _Unsupported:
    """``Method.unsupported``: {family: reason} of the registered families that lack one of ``needs``."""

    def __get__(self, obj, cls) -> dict[str, str]:
        from ..models.families import refusals

        return refusals(cls)


class Method:
    """Base class. Subclasses set ``name`` and ``stages`` and implement the ``select_*`` they need.

    Budgets: ``keep=N`` (tokens per image) or ``ratio=r`` (fraction of the image's tokens kept);
    adaptive methods take neither.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[Stage, ...]] = ()
    #: decoder layers whose *input* is pruned (LLM stage); attention is read from the layer before
    llm_layers: tuple[int, ...] = ()
    #: extra tokens the method appends per image crop inside the vision tower (test-time registers)
    extra_tokens: int = 0
    #: True when each crop's [CLS] token (its feature-layer state, projected) reaches the LLM as one more
    #: extra token after the image's kept patches, counted in the budget (VisionZip's official code)
    forwards_cls: bool = False
    #: inner vision blocks whose attention the method reads through ``ctx.vision_attention``
    attention_layers: tuple[int, ...] = ()
    #: True when the method needs each crop's full patch grid (LLaVA-NeXT: layout="flat" only)
    needs_full_grid: ClassVar[bool] = False
    #: LLaVA-NeXT layout when apply() is given none: "model" (unpadding + newline tokens) or "flat"
    default_layout: ClassVar[str] = "model"
    #: positions the LLM sees when apply() is given none: "original" (every kept token keeps its
    #: position) or "contiguous" (renumbered without gaps, as most baselines' official LLaVA code does)
    default_positions: ClassVar[str] = "original"
    #: the official implementation the default follows, "owner/repo@commit path::function" ("" = none)
    official_code: ClassVar[str] = ""
    #: True when the method has no budget of its own: keep=N or ratio=r is then required
    needs_budget: ClassVar[bool] = False
    #: capabilities the model family must have (``vtprune.models.families.CAPABILITIES``), e.g.
    #: {"cls_attention"}; the families lacking one are refused (see ``unsupported``)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: why the method needs a capability, as the refusal reads it (default: the capability's own reason)
    need_reasons: ClassVar[dict[str, str]] = {}
    #: families this method refuses, with the reason — derived from ``needs`` × the families' capabilities
    unsupported: ClassVar[dict[str, str]] = _Unsupported()  # type: ignore[assignment]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:  # arguments are checked before the method's own __init__ runs
            cls.__init__ = validated(cls.__init__)

    def __init__(self, keep: int | None = None, ratio: float | None = None, seed: int = 0):
        if keep is not None and ratio is not None:
            raise BudgetError("Give either keep=N or ratio=r, not both.")
        if keep is None and ratio is None and self.needs_budget:
            raise BudgetError(f"Method '{self.name}' needs a budget: pass keep=N or ratio=r.")
        if keep is not None and keep <= 0:
            raise BudgetError(f"keep must be a positive number of tokens, got {keep}.")
        if ratio is not None and not (0.0 < float(ratio) < 1.0):
            raise BudgetError(f"ratio must lie strictly between 0 and 1, got {ratio}.")
        self.keep = keep
        self.ratio = ratio
        self.seed = seed

    # -- budgets -----------------------------------------------------------------------------
    def budget(self, n_tokens: int) -> int:
        """Number of tokens to keep out of ``n_tokens`` candidates; raises a clear error if impossible."""
        if self.keep is None and self.ratio is None:
            raise BudgetError(f"Method '{self.name}' needs a budget: pass keep=N or ratio=r.")
        if self.keep is not None:
            if self.keep >= n_tokens:
                raise BudgetError(
                    f"keep={self.keep} is not below the {n_tokens} visual tokens of this image; "
                    f"choose keep < {n_tokens} (or do not prune)."
                )
            return self.keep
        return max(1, int(round(self.ratio * n_tokens)))

    def generator(self, device: torch.device | str = "cpu", offset: int = 0) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.seed + offset)
        return g

    @classmethod
    def refusal(cls, family: str) -> str | None:
        """Why the method cannot run on ``family`` (the capabilities of ``needs`` it lacks), or None.
        An unknown family raises UnsupportedModelError naming the known ones."""
        import inspect

        from ..models.families import refusal

        declared = inspect.getattr_static(cls, "unsupported")
        if isinstance(declared, dict) and family in declared:  # an explicit refusal (older declarations)
            return declared[family]
        return refusal(cls.needs, cls.need_reasons, family)

    def check_family(self, family: str) -> None:
        reason = self.refusal(family)
        if reason is not None:
            raise UnsupportedMethodError(f"Method '{self.name}' does not support {family}: {reason}")

    @classmethod
    def stages_for(cls, family: str) -> tuple[Stage, ...]:
        """The insertion points the method runs at on ``family`` (the support matrix reads this). A method
        whose stage depends on the family overrides it, and its ``resolve`` sets ``stages`` from it."""
        return cls.stages

    # -- binding: configuration → the object that runs on one model -----------------------------
    def bind(self, family: str, num_layers: int) -> "Method":
        """The method as it runs on a model of ``family`` with ``num_layers`` decoder layers: a shallow
        copy on which ``resolve`` set the family's defaults and validated them. The configured method is
        never changed, so one configured method can be bound to several models, each with its own
        family's values. ``apply`` binds; the handle's ``method`` is the bound copy."""
        bound = copy.copy(self)
        bound.resolve(family, num_layers)
        return bound

    def resolve(self, family: str, num_layers: int) -> None:
        """Called by ``bind`` on the copy only: set family-dependent fields and validate them. The
        default checks the family against ``needs``. Assign fields; never mutate a container shared
        with the configured method (the copy is shallow)."""
        self.check_family(family)

    def check_model(self, adapter) -> None:
        """Called by ``apply`` on the bound method before the model is touched: refuse arguments this
        model cannot meet. The default checks ``attention_layers`` against the depth of the vision tower."""
        depth = adapter.vision_depth
        for block in self.attention_layers:
            if not 0 <= block < depth:
                raise ArgumentError(f"{self.name} reads the attention of vision block {block + 1} (1-based), but this "
                                    f"model's vision tower has {depth} blocks; choose a block in 1..{depth}.")

    def load_resources(self, adapter) -> None:
        """Called once by ``apply`` on the bound method, after ``check_model`` and before the model is
        patched: load what the method needs from disk or from the model (a checkpoint, calibrated
        neurons, a text encoder), so that a missing resource raises before anything changes. The
        default loads nothing."""

    def vision_tower_patch(self, adapter):
        """A context manager that changes the vision tower while it runs (e.g. appends test-time
        registers), or None. Called once per forward with the model adapter; it loads nothing
        (``load_resources`` did)."""
        return None

    # -- selection hooks (override what the stages need) --------------------------------------
    def select_vision(self, ctx: "ImageContext") -> Selection:
        raise NotImplementedError

    def select_projected(self, ctx: "ImageContext") -> Selection:
        raise NotImplementedError

    def select_llm(self, ctx: "LLMContext") -> Selection:
        raise NotImplementedError

    def describe(self) -> str:
        budget = f"keep={self.keep}" if self.keep is not None else f"ratio={self.ratio}" if self.ratio else ""
        return f"{self.name}({budget})"

    def __repr__(self) -> str:
        return self.describe()


Method.__init__ = validated(Method.__init__)


class Instruction:
    """The text after one image (up to the next image): its token ids, and the LLM's input embeddings
    of them, computed when a method first asks."""

    def __init__(self, ids: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor]):
        self.ids = ids
        self._embed = embed
        self._embeddings: torch.Tensor | None = None

    @property
    def embeddings(self) -> torch.Tensor:
        if self._embeddings is None:
            self._embeddings = self._embed(self.ids).detach()
        return self._embeddings


class _Lazy:
    """A per-context cache of values computed on first access."""

    def __init__(self, providers: dict[str, Callable[[], Any]]):
        self._providers = providers
        self._values: dict[str, Any] = {}

    def get(self, key: str, what: str) -> Any:
        if key not in self._values:
            if key not in self._providers:
                raise UnsupportedMethodError(f"This model family cannot provide {what}.")
            self._values[key] = self._providers[key]()
        return self._values[key]

    def function(self, key: str, what: str) -> Callable:
        """A provider that takes arguments (a layer, query rows); returned uncalled."""
        if key not in self._providers:
            raise UnsupportedMethodError(f"This model family cannot provide {what}.")
        return self._providers[key]


class ImageContext:
    """Everything a vision- or projected-stage method may ask about one image.

    features       (N, D) candidate tokens: vision stage = the feature layer's patch tokens (CLS
                   removed; Qwen: mean of each 2×2 group); projected stage = the projector's output.
    grids          list of (rows, cols) per crop; LLaVA-1.5 and Qwen have a single crop.
    crop_slices    the candidate range of each crop inside ``features``.
    cls_attention  (H, N) attention of the CLS query to the candidates at the feature layer
                   (CLS towers only), fp32 probabilities of the full softmax row.
    received_attention (N,) mean attention each candidate receives from all tokens at the
                   feature layer (every tower).
    text_embeddings (T, D_llm) the LLM's input embeddings of the text tokens after the image.
    vision_features (N, D_vision) projected stage (CLIP towers): the feature layer's candidate tokens
                   before the projector.
    keys           (H, N, d) the keys of the feature layer's attention at the candidates, as the
                   block's key projection produced them (CLIP towers).
    hidden(layer)  (N, D) the tower's hidden states after block ``layer`` at candidate positions.
    extra          number of appended non-patch tokens at the end of each crop (registers).
    """

    def __init__(self, *, features: torch.Tensor, grids: list[tuple[int, int]], crop_slices: list[slice],
                 family: str, image_index: int, extra: int = 0,
                 providers: dict[str, Callable[[], Any]] | None = None):
        self.features = features
        self.grids = grids
        self.crop_slices = crop_slices
        self.family = family
        self.image_index = image_index
        self.extra = extra
        self._lazy = _Lazy(providers or {})

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    @property
    def capabilities(self) -> frozenset[str]:
        """The capabilities of the model family (``vtprune.models.families``), e.g. "cls_attention"."""
        from ..models.families import get

        return get(self.family).capabilities

    @property
    def cls_attention(self) -> torch.Tensor:
        return self._lazy.get("cls_attention", "a CLS-token attention row (its vision tower has no CLS token)")

    @property
    def received_attention(self) -> torch.Tensor:
        return self._lazy.get("received_attention", "received attention at the feature layer")

    @property
    def register_received_attention(self) -> torch.Tensor:
        """(R,) mean attention each register (one per crop) receives, like ``received_attention``."""
        return self._lazy.get("register_received_attention", "register attention (no register in this tower)")

    @property
    def keys(self) -> torch.Tensor:
        return self._lazy.get("keys", "the vision tower's keys at the feature layer")

    @property
    def register_features(self) -> torch.Tensor:
        """(R, D) the feature layer's test-time register tokens of every crop (CLIP-style towers)."""
        return self._lazy.get("register_features", "register features (no register in this tower)")

    @property
    def cls_features(self) -> torch.Tensor:
        """(crops, D) the feature layer's [CLS] token of every crop (CLIP-style towers)."""
        return self._lazy.get("cls_features", "the [CLS] token's features")

    @property
    def text_embeddings(self) -> torch.Tensor:
        return self._lazy.get("text_embeddings", "text embeddings of the instruction")

    @property
    def instruction_ids(self) -> torch.Tensor:
        """(T,) the token ids of the text after the image (projected stage)."""
        return self._lazy.get("instruction_ids", "the instruction's token ids")

    @property
    def vision_features(self) -> torch.Tensor:
        return self._lazy.get("vision_features", "the feature layer's tokens before the projector")

    def hidden(self, layer: int) -> torch.Tensor:
        return self._lazy.function("hidden", "hidden states of inner vision layers")(layer)

    def vision_attention(self, layer: int) -> torch.Tensor:
        """(C, H, Q, K) full attention probabilities of vision block ``layer`` for each of this
        image's C crops (CLS first where the tower has one), fp32. The method must list the block in
        ``attention_layers`` so that it is recorded while the tower runs."""
        return self._lazy.function("vision_attention", "attention maps of inner vision layers")(layer)


class LLMContext:
    """Everything an LLM-stage method may ask about one sample at one pruning layer.

    hidden       (L, D) the sample's hidden states entering layer ``layer`` (no padding).
    visual       (V,) positions in [0, L) of the candidate visual tokens, ascending.
    text_after   positions of the text tokens after the last image (question, template, prompt).
    registers    positions of register tokens (kept by the pipeline; references for OccamToken).
    last         position of the last token.
    attention(rows) (H, R, L) fp32 attention probabilities of layer ``layer-1`` for query rows
                 ``rows`` (positions in [0, L)), causal, full softmax rows.
    keys()       (H_kv, L, head_dim) the keys of layer ``layer-1`` after RoPE.
    input_embeddings() (visual (V0, D), text (T, D)): the input embeddings of the first decoder layer
                 for the candidates that entered the LLM (before any stage pruned them) and for
                 ``text_after``.
    layer_attention(rows) (H, R, L) fp32 attention probabilities for query rows ``rows`` computed by
                 layer ``layer`` itself (its input norm, q/k projections and RoPE) on ``hidden``, the
                 states entering it — what PyramidDrop's official code ranks with.
    final_norm(x) the LLM's final norm (e.g. RMSNorm with its weight) applied to ``x`` (..., D).
    stage_index  which of the method's ``llm_layers`` this is.
    """

    def __init__(self, *, hidden: torch.Tensor, visual: torch.Tensor, text_after: torch.Tensor,
                 layer: int, stage_index: int, family: str, original_visual: int,
                 providers: dict[str, Callable[[], Any]], registers: torch.Tensor | None = None):
        self.hidden = hidden
        self.registers = registers if registers is not None else torch.zeros(0, dtype=torch.long)
        self.visual = visual
        self.text_after = text_after
        self.layer = layer
        self.stage_index = stage_index
        self.family = family
        self.original_visual = original_visual  # visual tokens of this sample entering the LLM
        self._lazy = _Lazy(providers)

    @property
    def capabilities(self) -> frozenset[str]:
        """The capabilities of the model family (``vtprune.models.families``)."""
        from ..models.families import get

        return get(self.family).capabilities

    @property
    def last(self) -> int:
        return self.hidden.shape[0] - 1

    def attention(self, rows: torch.Tensor) -> torch.Tensor:
        return self._lazy.function("attention", "decoder attention rows")(rows)

    def keys(self) -> torch.Tensor:
        return self._lazy.get("keys", "decoder keys")

    def input_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lazy.get("input_embeddings", "the decoder's input embeddings")

    def layer_attention(self, rows: torch.Tensor) -> torch.Tensor:
        return self._lazy.function("layer_attention", "attention rows computed by the pruning layer")(rows)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self._lazy.function("final_norm", "the LLM's final norm")(x)


# -- registry --------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to the methods ``apply(model, cls.name)`` knows."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    from . import _load_all  # noqa: F401  (imports every method module)

    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    available_methods()
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownMethodError(
            f"Unknown method {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[key]


def make_method(spec: "Method | str", **kwargs: Any) -> Method:
    """A Method instance from an instance, or from a registered name plus its arguments."""
    if isinstance(spec, Method):
        if kwargs:
            raise ArgumentError(f"Arguments ({', '.join(kwargs)}) go with a method name, not with a Method instance "
                                f"({spec!r}); set them when constructing the method.")
        return spec
    if isinstance(spec, tuple):  # ("fastv", {"keep": 64})
        well_formed = 1 <= len(spec) <= 2 and isinstance(spec[0], str) and (len(spec) == 1 or isinstance(spec[1], dict))
        if not well_formed:
            raise ArgumentError(f"A method given as a tuple is (name, {{arguments}}), e.g. ('fastv', {{'keep': 64}}); "
                                f"got {spec!r}.")
        extra = spec[1] if len(spec) == 2 else {}
        return method_class(spec[0])(**{**extra, **kwargs})
    if isinstance(spec, str):
        return method_class(spec)(**kwargs)
    raise ArgumentError(f"Expected a vtprune Method or a method name, got {type(spec).__name__}.")
