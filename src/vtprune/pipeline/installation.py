"""``Installation``: what one ``apply()`` installed on a model (the wrapped forward, the decoder hooks,
the decoding sessions), its lifecycle and the wrapped forward's dispatch."""
from __future__ import annotations

import weakref

from .._compat import cache_argument
from ..errors import InputError
from ..methods.base import Method, Stage
from ..models import families
from ..models.base import Adapter
from ..stats import CallStats
from .decode import continue_session
from .forward_patch import ForwardPatch
from .llm_stage import LLMStage
from .prefill import PrefillCall, run_prefill


class Installation:
    """Holds the method, the adapter, the hooks and the statistics of one ``apply()``."""

    def __init__(self, model, method: Method, adapter: Adapter, stats_log: list, positions: str = "original"):
        self.model = model
        self.method = method
        self.adapter = adapter
        self.contiguous = positions == "contiguous"
        self.pixel_keys = families.get(adapter.family).pixel_keys  # a call with any of them is a prefill
        self.stats_log = stats_log
        self.sessions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._call: PrefillCall | None = None  # set only while a pruned prefill runs
        self.llm_stage = LLMStage(adapter, method, self.contiguous, lambda: self._call) \
            if Stage.LLM in method.stages else None
        self._patch = ForwardPatch(model, self._forward)
        self.original_forward = self._patch.original
        if self.llm_stage is not None:
            try:
                self.llm_stage.install_hooks()
            except BaseException:
                self.remove()
                raise

    # -- lifecycle ------------------------------------------------------------------------------
    def remove(self) -> None:
        if self.llm_stage is not None:
            self.llm_stage.remove()
        self._patch.restore()
        self._call = None

    # -- the wrapped forward ----------------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        if args:  # positional input_ids
            kwargs["input_ids"] = args[0]
            if len(args) > 1:
                raise TypeError("Call the pruned model with keyword arguments after input_ids.")
        cache = cache_argument(kwargs)
        if kwargs.get("mm_encoder_outputs"):
            raise InputError("A pruned model runs its vision tower itself: pass pixel_values, not mm_encoder_outputs.")
        if any(kwargs.get(k) is not None for k in self.pixel_keys) and kwargs.get("input_ids") is not None:
            if cache is None or cache.get_seq_length() == 0:
                return self._prefill(kwargs)
        if cache is not None and cache in self.sessions:
            return continue_session(self.adapter, self.original_forward, kwargs, self.sessions[cache])
        return self.original_forward(**kwargs)

    def _prefill(self, kwargs):
        positions = "contiguous" if self.contiguous else "original"
        call = PrefillCall(stats=CallStats(method=self.method.describe(), positions=positions))
        self._call = call
        try:
            return run_prefill(self, call, kwargs)
        finally:
            self._call = None  # also after an exception or a KeyboardInterrupt
