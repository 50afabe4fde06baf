"""The pipeline: runs a method at its insertion points around an unmodified HF model.

The model's ``forward`` is wrapped. On a prefill that carries images, the wrapper
1. runs the vision side through the adapter (vision / projected pruning happen there);
2. lays each sample out as text + kept image units, left-padded, at their *original* positions or
   (``positions="contiguous"``) numbered without gaps as the unmodified model would number them;
3. calls the model's own forward with the compact ``input_ids``, mask, explicit position ids and the
   precomputed image features (``mm_encoder_outputs``), with decoder-layer hooks for in-LLM pruning;
4. after an in-LLM prune, compacts the KV cache of the earlier layers to the kept tokens.
Later calls that continue that cache (``generate``'s decoding steps) are translated: the caller's
attention mask, which still counts the original tokens, is mapped onto the compact cache, and
positions continue from the original sequence length (contiguous: from the pruned one).

Modules, each readable alone:

``installation``   ``Installation``: the lifecycle of one ``apply()`` (install, ``remove``) and the wrapped
                   forward's dispatch (prefill / decoding step / plain call); creates the per-call
                   ``PrefillCall`` when a pruned prefill starts and drops it when it returns or raises.
``forward_patch``  wraps ``model.forward`` and restores exactly what was there (a forward on the instance
                   or none), hiding ``mm_encoder_outputs`` from ``generate``.
``prefill``        ``PrefillCall`` and the steps of one pruned prefill: vision side, rewritten image spans,
                   compaction into the left-padded layout, stats, the cache's ``Session``.
``layout``         ``Layout`` (which compact column sits at each slot, and what it holds) and the small
                   CPU index helpers that build and map layouts.
``positions``      position ids of the compact sequence: gathered (original), contiguous, rewritten spans.
``llm_stage``      the in-LLM stage: decoder-layer hooks, pruning at the method's layers, the inputs of the
                   new layout for later layers, the compaction of the KV cache after the prefill.
``decode``         ``Session`` and the mapping of decoding steps onto the compacted cache.
``records``        the deferred column / cell statistics (computed when someone reads them).

Family specifics live in the adapters (``Adapter.patch_decoder``: Qwen3-VL's DeepStack) and in
``vtprune.models.families`` (``image_input_keys``).
"""
from .installation import Installation

__all__ = ["Installation"]
