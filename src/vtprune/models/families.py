"""The model-family registry: everything vtprune knows about one model family, declared once.

Each family is declared by a :class:`Family` in its own module next to its adapter
(``vtprune/models/<family>.py``) and registered with :func:`register_family`. Code outside
``vtprune/models`` never names a family: it looks the family up (:func:`family_of_model`,
:func:`get`) and asks for what it needs — a capability (``family.has_cls``, ``"cls_attention" in
family.capabilities``), a per-family value (``family.defaults["occamtoken"]``, ``family.flops``) or
a per-family hook (``family.tiny.inputs``, ``family.register_tower``).

Methods declare the capabilities they need (``Method.needs``); which families a method supports is
computed from ``needs`` × ``capabilities`` (:func:`missing`), so the support matrix, the refusals
and ``vtprune methods`` always agree with the code.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable

from ..errors import UnsupportedModelError

#: every capability a family can declare, in the order refusal messages list the missing ones
CAPABILITIES: dict[str, str] = {
    "cls_attention": "its vision tower has no [CLS] token",
    "vision_merge": "its projector cannot take merged vision-stage tokens",
    "vision_attention": "its adapter does not record the attention of inner vision blocks",
    "fixed_grid": "its layout does not hold each crop's full patch grid",
    "anyres": "it has no AnyRes crops",
    "mrope": "it has no multimodal rotary positions",
    "deepstack": "it has no DeepStack features",
}


@dataclass(frozen=True)
class FlopsInfo:
    """What the FLOPs calculator (``vtprune.bench.flops``) needs beyond the config.

    tower        "clip" (batched ViT with CLS, one crop at a time, LLaVA MLP projector) or "merger"
                 (packed patch tower with a 2×2 patch merger).
    mlp_mats     matrices of a vision block's MLP (2: fc1/fc2; 3: SwiGLU gate/up/down).
    windowed     the tower uses window attention outside ``fullatt_block_indexes``.
    default_crops crops one image gives when the caller names no count (CLIP towers; 1 = one view).
    """

    tower: str
    mlp_mats: int = 2
    windowed: bool = False
    default_crops: int = 1


@dataclass(frozen=True)
class TinySpec:
    """The tiny random-weight test model of a family (``vtprune.tiny``).

    config       () -> a small transformers config of the family.
    inputs       (model, samples) -> (token rows, pixel_values, extra processor outputs) for
                 ``vtprune.tiny.make_inputs`` (rows are unpadded lists of token ids).
    image_size   default (H, W) of a tiny benchmark image.
    """

    config: Callable[[], Any]
    inputs: Callable[[Any, list], tuple[list[list[int]], Any, dict]]
    image_size: tuple[int, int] = (56, 56)


@dataclass(frozen=True)
class Family:
    """One model family.

    name            identifier used everywhere (stats, checkpoints, ``ctx.family``).
    display_name    how people write it ("LLaVA-1.5"); the README matrix header.
    hf_classes      transformers model classes the adapter serves (the first one builds tiny models).
    adapter         the :class:`~vtprune.models.base.Adapter` subclass.
    model_types     ``config.model_type`` values of the family (FLOPs calculator, presets).
    input_keys      the processor outputs the model's forward takes for images (and videos).
    pixel_keys      those of ``input_keys`` that carry pixels: a call with any of them is a prefill to prune.
    capabilities    booleans below; ``capabilities`` lists the true ones by name:
      has_cls          the vision tower has a [CLS] token (``ctx.cls_attention``)          "cls_attention"
      vision_merge     vision-stage selections may replace features (merging before the projector)
      vision_attention the adapter records inner vision blocks' attention (``ctx.vision_attention``)
      fixed_grid       the default layout holds each crop's full patch grid
      anyres           images come as several crops (base view + tiles)
      mrope            3-D multimodal rotary positions
      deepstack        vision features are also injected into the first decoder layers
    merge_factor    vision patches merged per LLM token along each side (1: none).
    layouts         image layouts the adapter accepts (``apply(layout=...)``); the first is the default.
    full_grid_layout the layout that gives every crop its full grid where ``fixed_grid`` is False.
    tower_group     families with the same tower_group share their vision tower (OC-VTP checkpoints).
    register_tower  the ``vtprune.occamtoken.towers.RegisterTower`` subclass for test-time registers / calibration.
    vision_classes  vision-config ``model_type`` -> (module, class) of the stand-alone vision tower.
    extract_adapter adapter used to read single-view tower features (OC-VTP extraction); None = adapter.
    flops           :class:`FlopsInfo`.
    defaults        per-method default arguments, e.g. ``{"occamtoken": {"lambda1": 0.015, "layer": 11}}``.
    tiny            :class:`TinySpec` of the tiny test model.
    vllm            (architecture name, module) of the vLLM variant in ``vtprune.serving``, or None.
    """

    name: str
    display_name: str
    hf_classes: tuple[str, ...]
    adapter: type
    model_types: tuple[str, ...]
    input_keys: tuple[str, ...] = ("pixel_values",)
    pixel_keys: tuple[str, ...] = ("pixel_values",)
    has_cls: bool = False
    vision_merge: bool = False
    vision_attention: bool = False
    fixed_grid: bool = True
    anyres: bool = False
    mrope: bool = False
    deepstack: bool = False
    merge_factor: int = 1
    layouts: tuple[str, ...] = ("model",)
    full_grid_layout: str | None = None
    tower_group: str = ""
    register_tower: type | None = None
    vision_classes: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    extract_adapter: type | None = None
    flops: FlopsInfo | None = None
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tiny: TinySpec | None = None
    vllm: tuple[str, str] | None = None

    @property
    def capabilities(self) -> frozenset[str]:
        flags = {"cls_attention": self.has_cls, "vision_merge": self.vision_merge,
                 "vision_attention": self.vision_attention, "fixed_grid": self.fixed_grid,
                 "anyres": self.anyres, "mrope": self.mrope, "deepstack": self.deepstack}
        return frozenset(k for k, v in flags.items() if v)

    def method_defaults(self, method: str) -> Mapping[str, Any]:
        """This family's default arguments of ``method``; a clear error if it declares none."""
        if method not in self.defaults:
            raise UnsupportedModelError(
                f"Model family {self.name!r} ({self.display_name}) declares no defaults for method '{method}'; "
                f"pass the method's arguments explicitly or add them to the family's declaration.")
        return self.defaults[method]


# -- the registry ------------------------------------------------------------------------------
#: modules of vtprune.models that hold shared code, not a family
_NOT_FAMILIES = ("base", "families", "stages")

_FAMILIES: dict[str, Family] = {}
_loaded = False


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (called by each family module)."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"model family {family.name!r} is declared twice")
    _FAMILIES[family.name] = family
    return family


def family_modules() -> list[str]:
    """The modules of ``vtprune.models`` that declare a family (every module but the shared ones), in
    name order: a new family is a new module, no list to edit."""
    package = importlib.import_module(__package__)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                  if not m.ispkg and m.name not in _NOT_FAMILIES)


def _load() -> None:
    global _loaded
    if not _loaded:
        for mod in family_modules():
            importlib.import_module(f"{__package__}.{mod}")
        _loaded = True


def all_families() -> tuple[Family, ...]:
    """Every registered family, in declaration order."""
    _load()
    return tuple(_FAMILIES.values())


def names() -> tuple[str, ...]:
    return tuple(f.name for f in all_families())


def get(name: "str | Family") -> Family:
    """The family called ``name``; an UnsupportedModelError naming the known ones otherwise."""
    if isinstance(name, Family):
        return name
    _load()
    if name not in _FAMILIES:
        raise UnsupportedModelError(
            f"Unknown model family {name!r}; vtprune knows {', '.join(map(repr, _FAMILIES))}.")
    return _FAMILIES[name]


def find(name: str) -> Family | None:
    """The family called ``name``, or None."""
    _load()
    return _FAMILIES.get(name)


def supported_classes() -> list[str]:
    return [c for f in all_families() for c in f.hf_classes]


def image_input_keys() -> tuple[str, ...]:
    """Every processor image input any family's forward takes (union of ``input_keys``, in order);
    what the pipeline takes out of a prefill's arguments."""
    return tuple(dict.fromkeys(k for f in all_families() for k in f.input_keys))


def family_of_model(model) -> Family:
    """The family of a transformers model (by its class or a base class)."""
    by_class = {c: f for f in all_families() for c in f.hf_classes}
    for cls in type(model).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__]
    raise UnsupportedModelError(
        f"vtprune has no adapter for {type(model).__name__}. Supported model classes: "
        f"{', '.join(supported_classes())}. Load your checkpoint with one of these classes."
    )


def family_of_config(config) -> Family | None:
    """The family of a config (by ``model_type``), or None."""
    model_type = getattr(config, "model_type", "") or ""
    for f in all_families():
        if model_type in f.model_types:
            return f
    return None


def tower_group(name: str | None) -> str | None:
    """The vision-tower group of family ``name``; an unknown name is its own group."""
    f = find(name) if isinstance(name, str) else None
    return (f.tower_group or f.name) if f is not None else name


def missing(needs, family: "str | Family") -> list[str]:
    """The capabilities of ``needs`` that ``family`` lacks, in CAPABILITIES order."""
    caps = get(family).capabilities
    unknown = set(needs) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {', '.join(CAPABILITIES)}")
    return [c for c in CAPABILITIES if c in needs and c not in caps]



def refusal(needs, need_reasons: Mapping[str, str], family: "str | Family") -> str | None:
    """Why a method with ``needs`` cannot run on ``family`` (``need_reasons`` overriding the capabilities'
    own reasons), or None when the family has every capability it needs."""
    lacking = missing(needs, family)
    if not lacking:
        return None
    return ", and ".join(need_reasons.get(c, CAPABILITIES[c]) for c in lacking)


def refusals(method_class) -> dict[str, str]:
    """{family: reason} of the registered families ``method_class`` refuses (``Method.unsupported``)."""
    out = {}
    for f in all_families():
        reason = method_class.refusal(f.name)
        if reason is not None:
            out[f.name] = reason
    return out

class FamilyDefaults(Mapping):
    """A read-only ``{family: value}`` view of one per-family default a method takes from the families'
    declarations (``Family.defaults[method][key]``), e.g. ``FamilyDefaults("occamtoken", "lambda1")``.
    An unknown family raises UnsupportedModelError naming the known ones."""

    def __init__(self, method: str, key: str):
        self.method, self.key = method, key

    def __getitem__(self, family: str) -> Any:
        defaults = get(family).method_defaults(self.method)
        if self.key not in defaults:
            raise UnsupportedModelError(
                f"Model family {family!r} declares no default {self.key!r} for method '{self.method}'; "
                f"pass {self.key}= explicitly.")
        return defaults[self.key]

    def __iter__(self):
        return iter(f.name for f in all_families() if self.key in f.defaults.get(self.method, {}))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"FamilyDefaults({self.method!r}, {self.key!r}: {dict(self)!r})"
