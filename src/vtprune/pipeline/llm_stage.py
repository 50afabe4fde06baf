"""The in-LLM stage: decoder-layer hooks that prune at the method's layers during a prefill, hand the
later layers the positions and mask of the new layout, and compact the KV cache afterwards."""
from __future__ import annotations

import bisect
import contextlib
import functools
from typing import Callable

import torch

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
        layers = self.adapter.decoder_layers
        with contextlib.ExitStack() as stack:
            call.recorders = {K: stack.enter_context(record_attention(layers[K - 1].self_attn))
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
        record = call.recorders[K].last
        stage = self.method.llm_layers.index(K)
        call.stage_layouts.append((K, layout))
        entering = call.stage_layouts[0][1]  # the layout the LLM started with (later stages see fewer)
        keep_slots, new_hidden_rows, new_candidates = [], [], []
        entering_call = functools.cache(lambda: attention_entering(self.adapter, K, hidden, kwargs))
        final_norm = lambda x: self.adapter.language_model.norm(x)  # noqa: E731 (resolved only when a method asks)
        width = layout.index.shape[1]
        for b in range(hidden.shape[0]):
            offset = width - layout.lengths[b]  # left-padded: the sample's slots are [offset, width)
            if len(layout.candidates[b]) == 0:  # a text-only sample (or nothing left): passes unpruned
                keep_slots.append(torch.arange(offset, width))
                new_hidden_rows.append(hidden[b, offset:])
                new_candidates.append(layout.candidates[b])
                if len(layout.protected[b]) or len(layout.fixed[b]):  # an image whose patches are all gone
                    call.stats.add_llm_stage(b, K, 0)
                continue
            # positions in the sample's slots of its candidates, text and registers: the columns of a row
            # ascend, so a binary search finds them
            n_cand, n_text = len(layout.candidates[b]), len(layout.text_after[b])
            found = torch.searchsorted(layout.index[b, offset:],
                                       torch.cat([layout.candidates[b], layout.text_after[b], layout.protected[b]]))
            cand_pos, text_pos, register_pos = found[:n_cand], found[n_cand:n_cand + n_text], found[n_cand + n_text:]
            ctx = LLMContext(
                hidden=hidden[b, offset:], visual=cand_pos, text_after=text_pos,
                layer=K, stage_index=stage, family=self.adapter.family,
                original_visual=len(entering.candidates[b]), registers=register_pos,
                providers={"attention": lambda rows, b=b, o=offset: record.rows(b, torch.as_tensor(rows) + o)[:, :, o:],
                           "keys": lambda b=b, o=offset: record.key[b][:, o:],
                           "input_embeddings": lambda b=b: tuple(
                               call.input_embeds[b, to_device(cols, call.input_embeds.device)]
                               for cols in (entering.candidates[b], entering.text_after[b])),
                           "layer_attention": lambda rows, b=b, o=offset: entering_call().rows(
                               b, torch.as_tensor(rows) + o)[:, :, o:],
                           "final_norm": final_norm})
            with call.stats.timer():
                selection = self.method.select_llm(ctx)
            kept = selection.keep.cpu()  # sync: the kept tokens decide the new layout (one per sample and stage)
            kept_pos = cand_pos[kept]
            kept_mask = torch.ones(layout.lengths[b], dtype=torch.bool)
            kept_mask[cand_pos] = False
            kept_mask[kept_pos] = True
            positions = torch.nonzero(kept_mask).flatten()  # CPU
            row = hidden[b, offset:][positions.to(hidden.device)]
            if selection.values is not None:
                row[torch.searchsorted(positions, kept_pos).to(row.device)] = selection.values.to(row.dtype)
            keep_slots.append(positions + offset)
            new_hidden_rows.append(row)
            new_candidates.append(layout.candidates[b][kept])
            call.stats.add_llm_stage(b, K, len(kept_pos), selection.info)
        new_hidden = left_pad(new_hidden_rows, 0.0)
        gather = left_pad(keep_slots, -1)  # slots into the current layout
        lengths = [len(s) for s in keep_slots]
        if min(lengths) == gather.shape[1]:  # no padding
            new_index = layout.index.gather(1, gather)
        else:
            new_index = torch.where(gather >= 0, layout.index.gather(1, gather.clamp(min=0)), -1)
        call.layout = Layout(index=new_index, candidates=new_candidates, protected=layout.protected,
                             fixed=layout.fixed, text_after=layout.text_after, lengths=lengths)
        call.layouts_after[K] = call.layout
        call.stage_gathers.append(gather)
        call.layer_kwargs = self._layer_inputs(call, kwargs, gather, new_hidden)
        return new_hidden

    def _layer_inputs(self, call: PrefillCall, kwargs, gather, new_hidden):
        """Position embeddings, position ids and the causal mask for the new layout."""
        from transformers.masking_utils import create_causal_mask

        mask2d = (gather >= 0).long()
        if self.contiguous:
            pos = contiguous_positions(mask2d, call.caller_positions).to(new_hidden.device)
            out = {"position_embeddings": self.adapter.language_model.rotary_emb(new_hidden, pos), "position_ids": pos}
        else:
            out = gathered_positions(kwargs, gather)
        # without padding the 2-D mask is all ones, which transformers treats as no mask; passing None
        # spares it the check (a read-back on an accelerator)
        device_mask = mask2d.to(new_hidden.device) if call.layout.padded else None
        # the cache argument goes by position: transformers renames it (past_key_values -> cache)
        attention_mask = create_causal_mask(self.adapter.text_config, new_hidden, device_mask, None)
        if isinstance(kwargs.get("attention_mask"), dict):
            attention_mask = {k: attention_mask for k in kwargs["attention_mask"]}
        out["attention_mask"] = attention_mask
        return out


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
    maps = compose_gathers(call.stage_gathers)  # per stage: the slots of the final layout in its input
    moved = {}
    for layer_idx, cache_layer in enumerate(cache.layers):
        stage = bisect.bisect_right(bounds, layer_idx)
        if stage == len(bounds):
            continue  # computed under the final layout already
        if stage not in moved:
            moved[stage] = maps[stage].to(cache_layer.keys.device)
        gather = moved[stage]
        for name in ("keys", "values"):
            t = getattr(cache_layer, name)
            view = gather.view(gather.shape[0], 1, gather.shape[1], 1).expand(t.shape[0], t.shape[1], -1, t.shape[3])
            setattr(cache_layer, name, t.gather(2, view))
