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
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
import weakref
from dataclasses import dataclass, field

import torch

from ._compat import cache_argument, output_cache
from .attention import record_attention
from .errors import InputError, UnsupportedMethodError
from .methods.base import Instruction, LLMContext, Method, Stage, to_device
from .models.base import Adapter, EncodedImage
from .stats import CallStats, ImageStats

_IMAGE_KWARGS = ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids")


@dataclass
class Session:
    """Bookkeeping for one KV cache produced by a pruned prefill."""

    compact_mask: torch.Tensor  # (B, Lc) mask of the compact prompt in the cache
    original_prompt_len: int  # columns of the caller's prompt attention mask
    original_seen: int  # original tokens seen so far (for default positions)
    #: (B,) added to the caller's decoding positions when the prefill laid images out with another
    #: token count than the caller's input (LLaVA-NeXT layout="flat"); None when the counts agree
    position_shift: torch.Tensor | None = None


@dataclass
class Layout:
    """Current token layout of the batch inside the decoder during a pruned prefill.

    index[b, j] = column of the compact prefill sequence at slot j (-1 = padding)."""

    index: torch.Tensor
    candidates: list[torch.Tensor]  # per sample, compact columns that are prunable visual tokens
    protected: list[torch.Tensor]  # per sample, visual columns that must stay (registers)
    fixed: list[torch.Tensor]  # per sample, visual columns that are never candidates (newline tokens)
    text_after: list[torch.Tensor]  # per sample, compact columns of the text after the last image

    @property
    def mask(self) -> torch.Tensor:
        return (self.index >= 0).long()


@dataclass
class PrefillCall:
    """Everything that belongs to one pruned prefill. The pruner creates it when the prefill starts
    and drops it when the prefill returns or raises, so nothing of one call can leak into the next."""

    stats: CallStats
    layout: Layout | None = None  # the current layout inside the decoder (in-LLM methods)
    layer_kwargs: dict | None = None  # positions and mask of the current layout, for later layers
    stage_layouts: list[tuple[int, Layout]] = field(default_factory=list)  # layout entering each stage
    recorders: dict = field(default_factory=dict)  # attention recorders per pruning layer
    source_columns: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (left pad, input columns)
    caller_positions: bool = False  # the caller passed position ids (numbered from each first real token)
    layouts_after: dict[int, Layout] = field(default_factory=dict)  # the layout after each in-LLM stage
    input_embeds: torch.Tensor | None = None  # (B, L, D) entering the first decoder layer (in-LLM methods)


def _left_pad(rows: list[torch.Tensor], fill) -> torch.Tensor:
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length) + tuple(rows[0].shape[1:]), fill, dtype=rows[0].dtype,
                     device=rows[0].device)
    for b, r in enumerate(rows):
        if len(r):
            out[b, length - len(r):] = r
    return out


class Pruner:
    """Holds the method, the adapter, the hooks and the statistics of one ``apply()``."""

    def __init__(self, model, method: Method, adapter: Adapter, stats_log: list, positions: str = "original"):
        self.model = model
        self.method = method
        self.adapter = adapter
        self.contiguous = positions == "contiguous"
        self.stats_log = stats_log
        self.sessions: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._call: PrefillCall | None = None  # set only while a pruned prefill runs
        self._hooks = []
        self._deepstack_owner = None
        if Stage.LLM in method.stages:
            self._check_llm_layers()
        # a forward set on the instance (accelerate's dispatch hooks) is put back by remove()
        self._instance_forward = model.__dict__.get("forward", _NOTHING)
        self._original_forward = model.forward
        original = self._original_forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return self._forward(*args, **kwargs)

        # generate() pre-encodes images when forward accepts `mm_encoder_outputs`; hiding that
        # parameter makes it hand us pixel_values at the prefill, where we run the vision side.
        signature = inspect.signature(original)
        forward.__signature__ = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "mm_encoder_outputs"])
        model.forward = forward
        if Stage.LLM in method.stages:
            try:
                self._install_llm_hooks()
            except BaseException:
                self.remove()
                raise

    # -- lifecycle ------------------------------------------------------------------------------
    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._instance_forward is _NOTHING:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self._instance_forward
        self._restore_deepstack()
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
        if kwargs.get("pixel_values") is not None and kwargs.get("input_ids") is not None:
            if cache is None or cache.get_seq_length() == 0:
                return self._prefill(kwargs)
        if cache is not None and cache in self.sessions:
            return self._continue(kwargs, self.sessions[cache])
        return self._original_forward(**kwargs)

    def _continue(self, kwargs, session: Session):
        mask = kwargs.get("attention_mask")
        q_len = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.adapter.format_positions(
                self._as_rows(self.adapter.decode_positions(session, mask, q_len)))
        if session.position_shift is not None:
            shift = session.position_shift.to(kwargs["position_ids"].device)
            kwargs["position_ids"] = kwargs["position_ids"] + shift.view(*([1] * (kwargs["position_ids"].dim() - 2)), -1, 1)
        if mask is not None:
            new_cols = mask[:, session.original_prompt_len:].to(session.compact_mask)
        else:
            new_cols = torch.ones(session.compact_mask.shape[0], session.original_seen - session.original_prompt_len
                                  + q_len, dtype=session.compact_mask.dtype, device=session.compact_mask.device)
        kwargs["attention_mask"] = torch.cat([session.compact_mask, new_cols], dim=1)
        session.original_seen += q_len
        return self._original_forward(**kwargs)

    def _as_rows(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.unsqueeze(0) if positions.dim() == 2 else positions

    # -- prefill --------------------------------------------------------------------------------
    def _prefill(self, kwargs):
        positions = "contiguous" if self.contiguous else "original"
        call = PrefillCall(stats=CallStats(method=self.method.describe(), positions=positions))
        self._call = call
        try:
            return self._run_prefill(call, kwargs)
        finally:
            self._call = None  # also after an exception or a KeyboardInterrupt

    def _run_prefill(self, call: PrefillCall, kwargs):
        t_start = time.perf_counter()
        stats = call.stats
        input_ids = kwargs.pop("input_ids")
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        user_positions = kwargs.pop("position_ids", None)
        call.caller_positions = user_positions is not None
        image_inputs = {k: kwargs.pop(k) for k in _IMAGE_KWARGS if k in kwargs}
        self.adapter.check_prefill_inputs(input_ids, image_inputs, user_positions)
        spans = self.adapter.image_spans(input_ids, image_inputs)
        real = attention_mask.detach().to("cpu", torch.bool)  # sync: the inputs' padding, read once per call
        instructions = [Instruction(ids, self.adapter.embed_tokens) for ids in self._text_after_each_image(input_ids, real, spans)]
        images = self.adapter.encode_images(image_inputs, self.method, instructions, stats.timer)
        full_ids, full_mask, span_units, rewritten = self._rewrite_spans(input_ids, attention_mask, spans, images)
        position_shift = None
        if rewritten:
            user_positions, position_shift = _rewritten_positions(
                attention_mask, full_mask, input_ids.shape[1], full_ids.shape[1], user_positions is not None)
        positions = self.adapter.full_positions(
            full_ids, full_mask, {**image_inputs, "mm_token_type_ids": None} if rewritten else image_inputs,
            self._as_rows_or_none(user_positions))
        if rewritten:
            real = full_mask.detach().to("cpu", torch.bool)  # sync: the rewritten sequence's padding
        ids, mask, pos, layout, newline_counts = self._compact(call, full_ids, full_mask, real, positions, span_units,
                                                               images)
        if self.contiguous:
            pos = _contiguous_positions(mask, call.caller_positions).unsqueeze(0)
        for im, newlines in zip(images, newline_counts):
            stats.images.append(ImageStats(candidates=im.candidates, after_pre_llm=len(im.keep) - im.n_extra - newlines,
                                           registers=im.n_extra, newlines=newlines, info=dict(im.info)))
        kwargs.update(input_ids=ids, attention_mask=mask, position_ids=self.adapter.format_positions(pos),
                      mm_encoder_outputs=self.adapter.mm_encoder_outputs(images))
        if Stage.LLM in self.method.stages:
            out = self._run_with_llm_pruning(call, kwargs, layout)
        else:
            out = self._original_forward(**kwargs)
        final_layout = call.layout if call.layout is not None else layout
        stats.defer(_ColumnRecord(call.source_columns, layout, final_layout, dict(call.layouts_after), span_units,
                                  [im.unit_cells for im in images]))
        cache = output_cache(out)
        if cache is not None:
            if self.contiguous:
                position_shift = _contiguous_shift(final_layout.mask, attention_mask, call.caller_positions)
            self.sessions[cache] = Session(compact_mask=final_layout.mask.to(mask),
                                           original_prompt_len=attention_mask.shape[1],
                                           original_seen=input_ids.shape[1], position_shift=position_shift)
        stats.total_seconds = time.perf_counter() - t_start
        self.stats_log.append(stats)
        return out

    def _as_rows_or_none(self, positions):
        return None if positions is None else self._as_rows(positions)

    def _text_after_each_image(self, input_ids, real, spans) -> list[torch.Tensor]:
        """Per image, the token ids of the text after it (up to the next image); ``real``: the CPU mask
        of the non-padding columns."""
        out = []
        for b, sample_spans in enumerate(spans):
            for k, (start, end) in enumerate(sample_spans):
                stop = sample_spans[k + 1][0] if k + 1 < len(sample_spans) else input_ids.shape[1]
                cols = _real_columns(real[b], end, stop).to(input_ids.device)
                out.append(input_ids[b, cols])
        return out

    def _rewrite_spans(self, input_ids, attention_mask, spans, images: list[EncodedImage]):
        """Full-length sequences in which each image occupies its ``n_units`` (layouts may differ from
        the processor's placeholder count, e.g. LLaVA-NeXT 'flat'). Returns ids, mask, per-sample
        (start, n_units) of each image in the new sequence, and whether anything changed."""
        rows_ids, rows_mask, span_units, changed, k = [], [], [], False, 0
        for b, sample_spans in enumerate(spans):
            ids, msk, units, cursor = [], [], [], 0
            for start, end in sample_spans:
                im = images[k]
                k += 1
                ids.append(input_ids[b, cursor:start])
                msk.append(attention_mask[b, cursor:start])
                units.append((sum(len(x) for x in ids), im.n_units))
                ids.append(torch.full((im.n_units,), self.adapter.image_token_id, dtype=input_ids.dtype,
                                      device=input_ids.device))
                msk.append(torch.ones(im.n_units, dtype=attention_mask.dtype, device=attention_mask.device))
                changed |= im.n_units != end - start
                cursor = end
            ids.append(input_ids[b, cursor:])
            msk.append(attention_mask[b, cursor:])
            rows_ids.append(torch.cat(ids))
            rows_mask.append(torch.cat(msk))
            span_units.append(units)
        if not changed:
            return input_ids, attention_mask, span_units, False
        # re-pad on the left so that the sequences line up again
        trimmed = [(r[_first_real(m):], m[_first_real(m):]) for r, m in zip(rows_ids, rows_mask)]
        shift = [len(r) - len(t[0]) for r, t in zip(rows_ids, trimmed)]
        span_units = [[(s - sh, n) for s, n in u] for u, sh in zip(span_units, shift)]
        ids = _left_pad([t[0] for t in trimmed], 0)
        mask = _left_pad([t[1] for t in trimmed], 0)
        pad = [ids.shape[1] - len(t[0]) for t in trimmed]
        span_units = [[(s + p, n) for s, n in u] for u, p in zip(span_units, pad)]
        return ids, mask, span_units, True

    def _compact(self, call: PrefillCall, ids, mask, real, positions, span_units, images):
        """Drop pruned image units and insert registers; left-pad the result. The bookkeeping runs on
        small CPU index tensors, vectorised (no per-token Python); ``real``: the CPU mask of ``mask``."""
        rows_cols, rows_kinds, newline_counts, k = [], [], [], 0
        for b, units in enumerate(span_units):
            cols, kinds, cursor = [], [], 0
            for start, n_units in units:
                im = images[k]
                k += 1
                text = _real_columns(real[b], cursor, start)
                keep = im.keep.cpu()  # sync: the units the method kept (one per image)
                unit_kinds = _unit_kinds(im, keep)
                newline_counts.append(int((unit_kinds == _NEWLINE).sum()))  # CPU tensor: no sync
                cols += [text, start + keep.clamp(max=n_units - 1)]  # extras sit at the last unit's position
                kinds += [torch.full_like(text, _TEXT), unit_kinds]
                cursor = start + n_units
            text = _real_columns(real[b], cursor, ids.shape[1])
            rows_cols.append(torch.cat(cols + [text]))
            rows_kinds.append(torch.cat(kinds + [torch.full_like(text, _TEXT)]))
        lengths = [len(c) for c in rows_cols]
        pads = [max(lengths) - n for n in lengths]
        device_cols = [c.to(ids.device) for c in rows_cols]
        out_ids = _left_pad([ids[b, c] for b, c in enumerate(device_cols)], 0)
        out_mask = _left_pad([torch.ones(n, dtype=mask.dtype, device=mask.device) for n in lengths], 0)
        out_pos = _left_pad([positions[:, b if positions.shape[1] > 1 else 0, c].T for b, c in enumerate(device_cols)],
                            0).permute(2, 0, 1)
        call.source_columns = list(zip(pads, rows_cols))

        def slots(kind):
            return [torch.nonzero(kd == kind).flatten() + p for kd, p in zip(rows_kinds, pads)]

        last_visual = [int(torch.nonzero(kd != _TEXT).max()) if bool((kd != _TEXT).any()) else -1 for kd in rows_kinds]
        layout = Layout(
            index=_left_pad([torch.arange(n) + p for n, p in zip(lengths, pads)], -1),
            candidates=slots(_CANDIDATE), protected=slots(_REGISTER), fixed=slots(_NEWLINE),
            text_after=[torch.arange(lv + 1, n) + p for lv, n, p in zip(last_visual, lengths, pads)],
        )
        return out_ids, out_mask, out_pos, layout, newline_counts

    # -- in-LLM pruning -----------------------------------------------------------------------------
    def _install_llm_hooks(self):
        layers = self.adapter.decoder_layers
        first = min(self.method.llm_layers)
        self._hooks.append(layers[0].register_forward_pre_hook(self._keep_input_embeds, with_kwargs=True))
        for i, layer in enumerate(layers):
            if i >= first:
                self._hooks.append(layer.register_forward_pre_hook(
                    functools.partial(self._layer_pre_hook, i), with_kwargs=True))
        self._patch_deepstack()

    def _check_llm_layers(self):
        layers = len(self.adapter.decoder_layers)
        if not self.method.llm_layers:
            raise UnsupportedMethodError(f"Method '{self.method.name}' prunes in the LLM but names no layer.")
        for K in self.method.llm_layers:
            if not 1 <= K < layers:
                raise UnsupportedMethodError(
                    f"Method '{self.method.name}' prunes at decoder layer {K}, but the model has {layers} "
                    f"layers; choose a layer in 1..{layers - 1}.")

    def _run_with_llm_pruning(self, call: PrefillCall, kwargs, layout: Layout):
        call.layout = layout
        layers = self.adapter.decoder_layers
        with contextlib.ExitStack() as stack:
            call.recorders = {K: stack.enter_context(record_attention(layers[K - 1].self_attn))
                              for K in self.method.llm_layers}
            out = self._original_forward(**kwargs)
        cache = output_cache(out)
        if cache is not None and call.stage_layouts:
            self._compact_cache(call, cache)
        return out

    def _keep_input_embeds(self, module, args, kwargs):
        if self._call is not None and self._call.layout is not None:
            self._call.input_embeds = args[0] if args else kwargs["hidden_states"]

    def _layer_pre_hook(self, layer_idx, module, args, kwargs):
        call = self._call
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
        entering_call = functools.cache(lambda: self._attention_entering(K, hidden, kwargs))
        final_norm = self.adapter.language_model.norm
        for b in range(hidden.shape[0]):
            valid = torch.nonzero(layout.index[b] >= 0).flatten()  # CPU; left-padded, so contiguous
            offset = int(valid[0]) if len(valid) else 0
            if len(layout.candidates[b]) == 0:  # a text-only sample (or nothing left): passes unpruned
                keep_slots.append(valid)
                new_hidden_rows.append(hidden[b, offset:])
                new_candidates.append(layout.candidates[b])
                if len(layout.protected[b]) or len(layout.fixed[b]):  # an image whose patches are all gone
                    call.stats.add_llm_stage(b, K, 0)
                continue
            slot_of = torch.full((int(layout.index[b].max()) + 1,), -1, dtype=torch.long)
            slot_of[layout.index[b, valid]] = valid
            cand_slots = slot_of[layout.candidates[b]]
            text_slots, register_slots = slot_of[layout.text_after[b]], slot_of[layout.protected[b]]
            ctx = LLMContext(
                hidden=hidden[b, offset:], visual=cand_slots - offset, text_after=text_slots[text_slots >= 0] - offset,
                layer=K, stage_index=stage, family=self.adapter.family,
                original_visual=len(entering.candidates[b]), registers=register_slots[register_slots >= 0] - offset,
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
            kept_cands = cand_slots[kept]
            kept_mask = torch.ones(len(valid), dtype=torch.bool)
            kept_mask[cand_slots - offset] = False
            kept_mask[kept_cands - offset] = True
            slots = valid[kept_mask]
            row = hidden[b, slots.to(hidden.device)]
            if selection.values is not None:
                row = row.clone()
                row[torch.searchsorted(slots, kept_cands).to(row.device)] = selection.values.to(row.dtype)
            keep_slots.append(slots)
            new_hidden_rows.append(row)
            new_candidates.append(layout.candidates[b][kept])
            call.stats.add_llm_stage(b, K, len(kept_cands), selection.info)
        new_hidden = _left_pad(new_hidden_rows, 0.0)
        gather = _left_pad(keep_slots, -1)  # slots into the current layout
        new_index = torch.where(gather >= 0, layout.index.gather(1, gather.clamp(min=0)), -1)
        call.layout = Layout(index=new_index, candidates=new_candidates, protected=layout.protected,
                             fixed=layout.fixed, text_after=layout.text_after)
        call.layouts_after[K] = call.layout
        call.layer_kwargs = self._layer_inputs(call, kwargs, gather, new_hidden)
        return new_hidden

    def _attention_entering(self, K, hidden, kwargs):
        """The query/key states layer K computes from ``hidden`` (its input norm, q/k projections and
        RoPE, with the positions and mask it is given), recorded by running its attention module once."""
        layer = self.adapter.decoder_layers[K]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            mask = mask.get("full_attention", next(iter(mask.values())))
        with torch.no_grad(), record_attention(layer.self_attn) as recorder:
            layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                            position_embeddings=kwargs["position_embeddings"])
        return recorder.last

    def _layer_inputs(self, call: PrefillCall, kwargs, gather, new_hidden):
        """Position embeddings, position ids and the causal mask for the new layout."""
        from transformers.masking_utils import create_causal_mask

        mask2d = (gather >= 0).long()
        if self.contiguous:
            pos = _contiguous_positions(mask2d, call.caller_positions).to(new_hidden.device)
            out = {"position_embeddings": self.adapter.language_model.rotary_emb(new_hidden, pos), "position_ids": pos}
        else:
            out = _gathered_positions(kwargs, gather)
        # the cache argument goes by position: transformers renames it (past_key_values -> cache)
        attention_mask = create_causal_mask(self.adapter.text_config, new_hidden, mask2d.to(new_hidden.device), None)
        if isinstance(kwargs.get("attention_mask"), dict):
            attention_mask = {k: attention_mask for k in kwargs["attention_mask"]}
        out["attention_mask"] = attention_mask
        return out

    @staticmethod
    def _compact_cache(call: PrefillCall, cache):
        """Gather every layer's cached keys/values onto the final layout."""
        final = call.layout
        bounds = [K for K, _ in call.stage_layouts]
        for layer_idx, cache_layer in enumerate(cache.layers):
            stage = sum(1 for K in bounds if K <= layer_idx)
            if stage == len(bounds):
                continue  # computed under the final layout already
            layout = call.stage_layouts[stage][1]
            gather = _map_layout(layout.index, final.index).to(cache_layer.keys.device)
            for name in ("keys", "values"):
                t = getattr(cache_layer, name)
                view = gather.view(gather.shape[0], 1, gather.shape[1], 1).expand(t.shape[0], t.shape[1], -1, t.shape[3])
                setattr(cache_layer, name, t.gather(2, view))

    # -- Qwen3-VL DeepStack ------------------------------------------------------------------------
    def _patch_deepstack(self):
        lm = self.adapter.language_model
        if not hasattr(lm, "_deepstack_process"):
            return
        original = lm._deepstack_process

        def deepstack(hidden_states, visual_pos_masks, visual_embeds):
            layout = self._call.layout if self._call is not None else None
            if layout is not None and visual_pos_masks.shape[1] != hidden_states.shape[1]:
                rank = visual_pos_masks.flatten().long().cumsum(0).view_as(visual_pos_masks) - 1
                idx = layout.index.clamp(min=0).to(visual_pos_masks.device)
                new_mask = visual_pos_masks.gather(1, idx) & (layout.index >= 0).to(visual_pos_masks.device)
                picked = rank.gather(1, idx)[new_mask]
                return original(hidden_states, new_mask, visual_embeds[picked])
            return original(hidden_states, visual_pos_masks, visual_embeds)

        lm._deepstack_process = deepstack
        self._deepstack_owner = lm

    def _restore_deepstack(self):
        owner, self._deepstack_owner = self._deepstack_owner, None
        if owner is not None and "_deepstack_process" in owner.__dict__:
            del owner._deepstack_process


@dataclass
class _ColumnRecord:
    """Fills a call's column and cell lists when someone reads them (``CallStats.defer``): the
    prefill keeps only the small CPU index tensors it needs, never the images' features."""

    source_columns: list[tuple[int, torch.Tensor]]  # per sample: (left pad, input column of each compact slot)
    entering: Layout
    final: Layout
    after_stage: dict[int, Layout]
    span_units: list[list[tuple[int, int]]]  # per sample: (start, n_units) of each image
    unit_cells: list[torch.Tensor | None]  # per image: (crop, row, col) of each unit

    def __call__(self, stats: CallStats) -> None:
        stats.set_columns("entering_columns", self.columns(self.entering))
        stats.set_columns("kept_columns", self.columns(self.final))
        stats.set_columns("stage_columns", {K: self.columns(layout) for K, layout in self.after_stage.items()})
        entering, kept = self.columns(self.entering, registers=False), self.columns(self.final, registers=False)
        k = 0
        for b, units in enumerate(self.span_units):
            for start, n_units in units:
                cells, im_stats = self.unit_cells[k], stats.images[k]
                k += 1
                if cells is None:
                    continue
                for name, cols in (("entering_cells", entering[b]), ("kept_cells", kept[b])):
                    im_stats._cells[name] = _cells_of(cells, [c - start for c in cols if start <= c < start + n_units])

    def columns(self, layout: Layout, registers: bool = True) -> list[list[int]]:
        """Per sample, the columns of the (full-layout) input sequence whose visual tokens remain (a
        register shows as the column of its image's last unit; ``registers=False`` leaves them out, so
        that a register does not count as that unit)."""
        out = []
        for b, (pad, cols) in enumerate(self.source_columns):
            parts = [layout.candidates[b], layout.fixed[b]] + ([layout.protected[b]] if registers else [])
            compact = torch.cat(parts).sort().values - pad
            out.append(cols[compact].tolist())
        return out


def _cells_of(unit_cells: torch.Tensor, units: list[int]) -> list[tuple[int, int, int]]:
    """The (crop, row, col) of the given units, newline tokens (crop -1) left out."""
    cells = unit_cells.cpu()[torch.tensor(units, dtype=torch.long)] if units else unit_cells[:0]
    return [tuple(c) for c in cells.tolist() if c[0] >= 0]


def _gathered_positions(kwargs, gather) -> dict:
    """The current position embeddings and ids at the slots ``gather`` keeps (original positions)."""
    cos, sin = kwargs["position_embeddings"]
    idx = gather.clamp(min=0).to(cos.device)

    def take(t):
        # sequence is the second-to-last dim for (B, L, d) and (3, B, L, d)
        view = idx.view(*([1] * (t.dim() - 3)), *idx.shape, 1).expand(*t.shape[:-2], idx.shape[1], t.shape[-1])
        return t.gather(t.dim() - 2, view)

    out = {"position_embeddings": (take(cos), take(sin))}
    pos = kwargs.get("position_ids")
    if pos is not None:
        out["position_ids"] = pos.expand(idx.shape[0], -1).gather(1, idx.to(pos.device)) if pos.dim() == 2 else pos
    return out


def _contiguous_positions(mask: torch.Tensor, caller_positions: bool) -> torch.Tensor:
    """(B, L) positions without gaps for a left-padded sequence with ``mask``, numbered as the
    unmodified model numbers its input: from each sample's first real token when the caller passes
    positions (``generate``), else by column."""
    if caller_positions:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)


def _contiguous_shift(final_mask: torch.Tensor, input_mask: torch.Tensor, caller_positions: bool) -> torch.Tensor:
    """(B,) what carries the caller's decoding positions (which count the unpruned prompt) onto the
    contiguous numbering of the pruned one."""
    if caller_positions:
        return (final_mask.sum(1).to(input_mask.device) - input_mask.sum(1)).long()
    return torch.full((final_mask.shape[0],), final_mask.shape[1] - input_mask.shape[1], dtype=torch.long)


_NOTHING = object()  # marks "no forward on the instance" (a forward of None is a value)
_TEXT, _CANDIDATE, _REGISTER, _NEWLINE = range(4)  # what a column of the compact sequence holds


def _real_columns(real_row: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The columns in [start, stop) that are not padding (``real_row``: a CPU bool mask)."""
    return torch.arange(start, stop)[real_row[start:stop]]


def _unit_kinds(im: EncodedImage, keep: torch.Tensor) -> torch.Tensor:
    """Per kept unit (``keep``: CPU indices into the image's units): candidate, register or newline."""
    kinds = torch.full_like(keep, _CANDIDATE)
    if im.unit_cells is not None:
        inside = keep < im.n_units
        newline = torch.zeros_like(keep, dtype=torch.bool)
        newline[inside] = im.unit_cells.cpu()[keep[inside], 0] < 0
        kinds[newline] = _NEWLINE
    if im.protected is not None:
        kinds[torch.isin(keep, im.protected.cpu())] = _REGISTER
    return kinds


def _rewritten_positions(mask, full_mask, length: int, full_length: int, caller_positions: bool):
    """1-D positions of a sequence whose image spans were rewritten (another token count), and the
    per-sample shift that carries the caller's decoding positions onto them. A caller that passes
    positions (``generate``) numbers each sample from its first real token, and so do we; otherwise
    the model numbers columns (padding included), and so do we."""
    if caller_positions:
        positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions, (full_mask.sum(1) - mask.sum(1)).long()
    positions = torch.arange(full_length, device=full_mask.device).expand(full_mask.shape[0], -1)
    return positions, torch.full((full_mask.shape[0],), full_length - length, dtype=torch.long)


def _first_real(mask: torch.Tensor) -> int:
    """The first non-padding column (LLaVA-NeXT flat layout only)."""
    nz = torch.nonzero(mask).flatten()
    return int(nz[0]) if len(nz) else len(mask)  # sync: once per sample, only when the layout was rewritten


def _map_layout(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, the slot in ``source`` of each entry of ``target`` (both hold compact columns, -1 =
    padding, ascending among valid entries). Padding maps to slot 0 (masked anyway). CPU tensors."""
    out = torch.zeros_like(target)
    for b in range(target.shape[0]):
        src, tgt = source[b], target[b]
        slot_of = torch.zeros(int(max(src.max(), tgt.max())) + 1, dtype=torch.long)
        valid = torch.nonzero(src >= 0).flatten()
        slot_of[src[valid]] = valid
        out[b] = torch.where(tgt >= 0, slot_of[tgt.clamp(min=0)], 0)
    return out
