"""The public entry points: ``apply``, ``pruned`` and the handle they return."""
from __future__ import annotations

import contextlib
from typing import Any

from .methods.base import Method, Stage, make_method
from .models.base import adapter_for
from .models.families import all_families, family_of_model
from .pipeline import Installation
from .stats import CallStats
from ._compat import check_transformers
from .errors import AlreadyPrunedError, ArgumentError, UnsupportedMethodError

LAYOUTS = ("model", "flat")
POSITIONS = ("original", "contiguous")


class PruneHandle:
    """Returned by :func:`apply`. ``stats`` lists one :class:`CallStats` per pruned prefill;
    ``last`` is the newest; ``remove()`` restores the model exactly. ``method`` is the method bound to
    this model (what runs: the family's defaults resolved, its resources loaded); ``configured`` is the
    method as given to ``apply``, never changed by it."""

    def __init__(self, model, method: Method, installation: Installation, stats: list[CallStats], configured: Method):
        self.model = model
        self.method = method
        self.configured = configured
        self._installation = installation
        self.stats = stats

    @property
    def last(self) -> CallStats | None:
        return self.stats[-1] if self.stats else None

    @property
    def num_layers(self) -> int:
        return len(self._installation.adapter.decoder_layers)

    def summary(self) -> dict[str, Any]:
        """Mean visual tokens per image entering the LLM and layer-averaged, over all calls."""
        entering = [n for s in self.stats for n in s.tokens_entering_llm]
        averaged = [n for s in self.stats for n in s.layer_averaged(self.num_layers)]
        return {
            "method": self.method.describe(),
            "calls": len(self.stats),
            "images": len(entering),
            "mean_tokens_entering_llm": sum(entering) / len(entering) if entering else None,
            "mean_tokens_layer_averaged": sum(averaged) / len(averaged) if averaged else None,
            "method_seconds": sum(s.method_seconds for s in self.stats),
        }

    def reset_stats(self) -> None:
        self.stats.clear()

    def remove(self) -> None:
        self._installation.remove()
        if getattr(self.model, "_vtprune_handle", None) is self:
            del self.model._vtprune_handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _decoder_depth(model) -> int:
    text = getattr(model.config, "text_config", model.config)
    return int(text.num_hidden_layers)


def apply(model, method: Method | str, *, layout: str | None = None, positions: str | None = None,
          **method_kwargs) -> PruneHandle:
    """Prune ``model``'s visual tokens with ``method`` from now on.

    ``method`` is a :class:`~vtprune.methods.Method` or a registered name with its arguments, e.g.
    ``apply(model, "fastv", keep=64)``. ``layout`` (LLaVA-NeXT only): "model" keeps the model's
    unpad + newline layout, "flat" uses base + crops without newlines; by default the method's own
    (OccamToken: "flat", the paper's accounting; every other method: "model"). ``positions``:
    "original" keeps every kept token at its position in the unpruned sequence; "contiguous" numbers the
    pruned sequence without gaps, as the unmodified model would number it (in-LLM stages renumber the
    tokens after each stage, and decoding continues from the last number). By default the method's
    own (``method.default_positions``: what its official LLaVA code does); Qwen models always keep
    original positions (M-RoPE). Returns a handle with
    ``stats`` and ``remove()``; the model keeps its attention implementation.

    ``method`` is bound to this model (``method.bind``: a copy with the family's defaults) and loads its
    resources (``load_resources``) here; the method you pass is not changed, so one configured method
    can be applied to several models. Every argument is checked and every resource loaded before the
    model is touched: a wrong one raises a :class:`~vtprune.errors.VTPruneError` that names it.
    """
    check_transformers()
    if layout is not None and layout not in LAYOUTS:
        raise ArgumentError(f"layout={layout!r} is not allowed; choose one of {', '.join(map(repr, LAYOUTS))}.")
    method = make_method(method, **method_kwargs)
    info = family_of_model(model)
    family = info.name
    if layout is not None and layout not in info.layouts:
        takes = [f.display_name for f in all_families() if layout in f.layouts]
        raise UnsupportedMethodError(f"layout={layout!r} applies to {', '.join(takes)} only.")
    if positions is not None and positions not in POSITIONS:
        raise ArgumentError(f"positions={positions!r} is not allowed; choose one of {', '.join(map(repr, POSITIONS))}.")
    if getattr(model, "_vtprune_handle", None) is not None:
        raise AlreadyPrunedError("This model is already pruned; call handle.remove() before applying another method.")
    configured = method
    method = configured.bind(family, _decoder_depth(model))
    options = {"layout": layout or method.default_layout} if len(info.layouts) > 1 else {}
    adapter = adapter_for(model, **options)
    if not method.stages:
        raise UnsupportedMethodError(f"Method '{method.name}' declares no insertion point.")
    method.check_model(adapter)
    positions = _resolve_positions(positions, method, adapter)
    method.load_resources(adapter)  # the last check: a missing checkpoint raises before the model is patched
    stats: list[CallStats] = []
    installation = Installation(model, method, adapter, stats, positions=positions)
    handle = PruneHandle(model, method, installation, stats, configured)
    model._vtprune_handle = handle
    return handle


def _resolve_positions(positions: str | None, method: Method, adapter) -> str:
    """The caller's choice, else the method's default; a family with other position ids keeps the
    original ones unless the caller insisted on contiguous ones (then: a clear error)."""
    reason = adapter.contiguous_positions_unsupported
    if positions == "contiguous" and reason:
        raise UnsupportedMethodError(f"positions='contiguous' does not apply to {adapter.family}: {reason}.")
    if positions is None:
        positions = "original" if reason else method.default_positions
    return positions


@contextlib.contextmanager
def pruned(model, method: Method | str, **kwargs):
    """``with vtprune.pruned(model, "fastv", keep=64) as handle: model.generate(...)``."""
    handle = apply(model, method, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
