"""The in-LLM stage: decoder-layer hooks that prune at the method's layers during a prefill, hand the
later layers the positions and mask of the new layout, and compact the KV cache afterwards."""
from __future__ import annotations

import bisect
import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.masking_utils import create_causal_mask

from .._compat import output_cache
from ..attention import record_attention
from ..errors import UnsupportedMethodError
from ..methods.base import LLMContext, Method, to_device
from ..models.base import Adapter
from .layout import Layout, compose_gathers, left_pad
from .positions import contiguous_positions, gathered_positions
from .prefill import PrefillCall


def check_llm_layers(adapter: Adapter, method: Method) -> None:
    layers = len(adapter.decoder_layers)
    if not method.llm_layers:
        raise UnsupportedMethodError(f"Method '{method.name}' prunes in the LLM but names no layer.")
    for K in method.llm_layers:
        if not 1 <= K < layers:
            raise UnsupportedMethodError(
                f"Method '{method.name}' prunes at decoder layer {K}, but the model has {layers} "
                f"layers; choose a layer in 1..{layers - 1}.")


class LLMStage:
    """The hooks of one ``apply()``; ``current_call()`` is the running pruned prefill (None outside one)."""

    def __init__(self, adapter: Adapter, method: Method, contiguous: bool,
                 current_call: Callable[[], PrefillCall | None]):
        check_llm_layers(adapter, method)
        self.adapter = adapter
        self.method = method
        self.contiguous = contiguous
        self.current_call = current_call
        self._hooks = []
        # read once: the adapter's properties walk the module tree, and config reads are slow
        self._stage_index = {K: method.llm_layers.index(K) for K in method.llm_layers}
        self._language_model = adapter.language_model
        self._layers = adapter.decoder_layers
        self._family = adapter.family
        self._text_config = adapter.text_config
        self._restore_decoder = None

    def install_hooks(self) -> None:
        layers = self.adapter.decoder_layers
        first = min(self.method.llm_layers)
        self._hooks.append(layers[0].register_forward_pre_hook(self._keep_input_embeds, with_kwargs=True))
        for i, layer in enumerate(layers):
            if i >= first:
                self._hooks.append(layer.register_forward_pre_hook(
                    functools.partial(self._layer_pre_hook, i), with_kwargs=True))
        self._restore_decoder = self.adapter.patch_decoder(self._current_layout)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        restore, self._restore_decoder = self._restore_decoder, None
        if restore is not None:
            restore()

    def _current_layout(self) -> Layout | None:
        call = self.current_call()
        return call.layout if call is not None else None

    def run_with_llm_pruning(self, call: PrefillCall, forward, kwargs, layout: Layout):
        call.layout = layout
        with contextlib.ExitStack() as stack:
            call.recorders = {K: stack.enter_context(record_attention(self._layers[K - 1].self_attn))
                              for K in self.method.llm_layers}
            out = forward(**kwargs)
        cache = output_cache(out)
        if cache is not None and call.stage_layouts:
            compact_cache(call, cache)
        return out

    def _keep_input_embeds(self, module, args, kwargs):
        call = self.current_call()
        if call is not None and call.layout is not None:
            call.input_embeds = args[0] if args else kwargs["hidden_states"]

    def _layer_pre_hook(self, layer_idx, module, args, kwargs):
        call = self.current_call()
        if call is None or call.layout is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        # the inputs of the current layout first: a later stage gathers from them, not from the model's
        if call.layer_kwargs is not None:
            kwargs.update(call.layer_kwargs)
        if layer_idx in self.method.llm_layers:
            hidden = self._prune_at(call, layer_idx, hidden, kwargs)
            kwargs.update(call.layer_kwargs)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _prune_at(self, call: PrefillCall, K, hidden, kwargs):
        layout = call.layout
        call.stage_layouts.append((K, layout))
        stage = _Stage(call, K, self._stage_index[K], hidden, kwargs, layout, call.stage_layouts[0][1],
                       functools.cache(lambda: attention_entering(self.adapter, K, hidden, kwargs)))
        picks = [self._pick(stage, b) for b in range(hidden.shape[0])]
        width = layout.index.shape[1]
        lengths = [len(positions) for positions, _, _ in picks]
        if not layout.padded and min(lengths) == max(lengths):  # no padding before or after: slot = position
            gather = torch.stack([positions for positions, _, _ in picks])
            new_hidden = _rows_at(hidden, gather, [merged for _, merged, _ in picks])
            new_index = layout.index.gather(1, gather)
        else:
            gather = left_pad([positions + (width - layout.lengths[b]) for b, (positions, _, _) in enumerate(picks)], -1)
            rows = []
            for b, (positions, merged, _) in enumerate(picks):
                sample = hidden[b:b + 1, width - layout.lengths[b]:]
                rows.append(_rows_at(sample, positions.unsqueeze(0), [merged])[0])
            new_hidden = left_pad(rows, 0.0)
            new_index = (layout.index.gather(1, gather) if min(lengths) == gather.shape[1]
                         else torch.where(gather >= 0, layout.index.gather(1, gather.clamp(min=0)), -1))
        call.layout = Layout(index=new_index, candidates=[candidates for _, _, candidates in picks],
                             protected=layout.protected, fixed=layout.fixed, text_after=layout.text_after,
                             lengths=lengths)
        call.layouts_after[K] = call.layout
        call.stage_gathers.append(gather)
        call.layer_kwargs = self._layer_inputs(call, kwargs, gather, new_hidden)
        return new_hidden

    def _pick(self, stage: "_Stage", b: int):
        """What sample ``b`` keeps at this stage: its kept slots (CPU, ascending, from its first slot),
        the merged values with the rows among them they replace (None: no merging) and its candidates."""
        call, layout = stage.call, stage.layout
        length = layout.lengths[b]
        if len(layout.candidates[b]) == 0:  # a text-only sample (or nothing left): passes unpruned
            if len(layout.protected[b]) or len(layout.fixed[b]):  # an image whose patches are all gone
                call.stats.add_llm_stage(b, stage.K, 0)
            return torch.arange(length), None, layout.candidates[b]
        cand_pos, text_pos, register_pos = self._positions(stage, b)
        selection = self._select(stage, b, cand_pos, text_pos, register_pos)
        kept = selection.keep.cpu()  # sync: the kept tokens decide the new layout (one per sample and stage)
        kept_pos = cand_pos[kept]
        kept_mask = torch.ones(length, dtype=torch.bool)
        kept_mask[cand_pos] = False
        kept_mask[kept_pos] = True
        positions = torch.nonzero(kept_mask).flatten()  # CPU
        merged = None
        if selection.values is not None:
            merged = (torch.searchsorted(positions, kept_pos), selection.values)
        call.stats.add_llm_stage(b, stage.K, len(kept_pos), selection.info)
        return positions, merged, layout.candidates[b][kept]

    @staticmethod
    def _positions(stage: "_Stage", b: int):
        """Positions in sample ``b``'s slots of its candidates, text after the images and registers."""
        layout = stage.layout
        offset = layout.index.shape[1] - layout.lengths[b]  # left-padded: the sample's slots are [offset, width)
        groups = (layout.candidates[b], layout.text_after[b], layout.protected[b])
        if layout is stage.entering:  # the layout the LLM started with: slot = compact column
            return groups if offset == 0 else tuple(g - offset for g in groups)
        # the columns of a row ascend, so a binary search finds them
        found = torch.searchsorted(layout.index[b, offset:], torch.cat(groups))
        return found.split([len(g) for g in groups])

    def _select(self, stage: "_Stage", b: int, cand_pos, text_pos, register_pos):
        call, layout, entering, record = stage.call, stage.layout, stage.entering, stage.record
        o = layout.index.shape[1] - layout.lengths[b]
        providers = {
            "attention": lambda rows: _unpadded(record.rows(b, _shifted(rows, o)), o),
            "keys": lambda: record.key[b][:, o:],
            "input_embeddings": lambda: tuple(call.input_embeds[b, to_device(cols, call.input_embeds.device)]
                                              for cols in (entering.candidates[b], entering.text_after[b])),
            "layer_attention": lambda rows: _unpadded(stage.entering_call().rows(b, _shifted(rows, o)), o),
            "final_norm": self._final_norm}
        ctx = LLMContext(hidden=stage.hidden[b, o:], visual=cand_pos, text_after=text_pos, layer=stage.K,
                         stage_index=stage.index, family=self._family, original_visual=len(entering.candidates[b]),
                         registers=register_pos, providers=providers)
        with call.stats.timer():
            return self.method.select_llm(ctx)

    def _final_norm(self, x):
        return self._language_model.norm(x)

    def _layer_inputs(self, call: PrefillCall, kwargs, gather, new_hidden):
        """Position embeddings, position ids and the causal mask for the new layout."""
        padded = call.layout.padded
        if self.contiguous:
            mask2d = (gather >= 0).long()
            pos = contiguous_positions(mask2d, call.caller_positions).to(new_hidden.device)
            out = {"position_embeddings": self._language_model.rotary_emb(new_hidden, pos), "position_ids": pos}
        else:
            out = gathered_positions(kwargs, gather, padded)
        incoming = kwargs.get("attention_mask")
        if incoming is None and not padded:
            # the model built no mask for the longer sequence (a plain causal one it leaves to the attention
            # kernel); transformers builds none for the shorter one either
            out["attention_mask"] = None
            return out
        # without padding the 2-D mask is all ones, which transformers treats as no mask; passing None
        # spares it the check (a read-back on an accelerator)
        device_mask = (gather >= 0).long().to(new_hidden.device) if padded else None
        # the cache argument goes by position: transformers renames it (past_key_values -> cache)
        attention_mask = create_causal_mask(self._text_config, new_hidden, device_mask, None)
        if isinstance(incoming, dict):
            attention_mask = {k: attention_mask for k in incoming}
        out["attention_mask"] = attention_mask
        return out


@dataclass
class _Stage:
    """What the samples of one pruning stage share."""

    call: PrefillCall
    K: int
    index: int  # which of the method's layers
    hidden: torch.Tensor  # (B, width, D) entering layer K
    kwargs: dict  # layer K's inputs
    layout: Layout  # the layout entering this stage
    entering: Layout  # the layout the LLM started with (later stages see fewer)
    entering_call: Callable  # () -> the attention layer K computes on ``hidden`` (computed once, when asked)

    @property
    def record(self):
        return self.call.recorders[self.K].last


def _shifted(rows, offset: int):
    return rows if offset == 0 else torch.as_tensor(rows) + offset


def _unpadded(probabilities: torch.Tensor, offset: int) -> torch.Tensor:
    return probabilities if offset == 0 else probabilities[:, :, offset:]


def _rows_at(hidden: torch.Tensor, slots: torch.Tensor, merges: list) -> torch.Tensor:
    """(B, L', D) the rows ``slots`` (CPU, (B, L')) of ``hidden``, with each sample's merged values
    (``merges[b]``: None, or the rows they replace and the values) written in."""
    idx = slots.to(hidden.device)
    rows = hidden.index_select(1, idx[0]) if hidden.shape[0] == 1 else hidden.gather(
        1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    for b, merged in enumerate(merges):
        if merged is not None:
            at, values = merged
            rows[b, at.to(rows.device)] = values.to(rows.dtype)
    return rows


def attention_entering(adapter: Adapter, K, hidden, kwargs):
    """The query/key states layer K computes from ``hidden`` (its input norm, q/k projections and
    RoPE, with the positions and mask it is given), recorded by running its attention module once."""
    layer = adapter.decoder_layers[K]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values())))
    with torch.no_grad(), record_attention(layer.self_attn) as recorder:
        layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                        position_embeddings=kwargs["position_embeddings"])
    return recorder.last


def compact_cache(call: PrefillCall, cache) -> None:
    """Gather every layer's cached keys/values onto the final layout."""
    bounds = [K for K, _ in call.stage_layouts]
    # per stage: the slots of the final layout in its input
    maps = compose_gathers(call.stage_gathers, padded=call.layout.padded)
    moved = {}
    for layer_idx, cache_layer in enumerate(cache.layers[:bounds[-1]]):  # the later ones hold the final layout
        stage = bisect.bisect_right(bounds, layer_idx)
        if stage not in moved:
            moved[stage] = maps[stage].to(cache_layer.keys.device)
        cache_layer.keys = take_slots(cache_layer.keys, moved[stage])
        cache_layer.values = take_slots(cache_layer.values, moved[stage])


def take_slots(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, H, L', d) the sequence slots ``slots`` (B, L') of ``t`` (B, H, L, d)."""
    if slots.shape[0] == 1:
        return t.index_select(2, slots[0])
    view = slots.view(slots.shape[0], 1, slots.shape[1], 1).expand(t.shape[0], t.shape[1], -1, t.shape[3])
    return t.gather(2, view)
