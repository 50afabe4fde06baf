"""A hand-built reference: runs a model's decoder layer by layer on only the tokens a pruning run
kept, at their original positions or numbered without gaps, with the masks that run implies. No
vtprune code is used."""
from __future__ import annotations

import torch


def capture_language_model_inputs(model, **inputs) -> dict:
    """Run the unmodified model once and keep what its language model received."""
    captured = {}
    lm = model.model.language_model

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return captured


def reference_logits(model, captured: dict, entering: list[int], kept: list[int], image_columns: list[int],
                     prompt_len: int, prune_layer: int | None,
                     stages: dict[int, list[int]] | None = None,
                     positions_mode: str = "original") -> tuple[torch.Tensor, list[int]]:
    """Logits of every remaining query column.

    entering: image columns whose tokens enter the LLM; kept: those left from ``prune_layer`` on.
    ``stages`` ({layer: image columns left from that layer on}) replaces kept/prune_layer for
    methods that prune at several layers. Queries at columns ≥ prompt_len (generated tokens) never
    see dropped tokens (compacted cache). ``positions_mode="contiguous"``: the prompt's remaining
    columns are numbered 0, 1, 2, … at every stage, and generated tokens continue from the number of
    prompt columns left after the last stage."""
    if stages is None:
        stages = {prune_layer: kept} if prune_layer is not None else {}
    kept = stages[max(stages)] if stages else list(entering)
    lm = model.model.language_model
    embeds = captured["inputs_embeds"][0]
    positions = captured["position_ids"]
    total = embeds.shape[0]
    if positions is None:  # the model's default: 0..L-1
        positions = torch.arange(total).unsqueeze(0)
    dropped_pre = set(image_columns) - set(entering)
    dropped_llm = set(entering) - set(kept)
    cols = [c for c in range(total) if c not in dropped_pre]
    deepstack = captured.get("deepstack_visual_embeds")
    visual_mask = captured.get("visual_pos_masks")
    rank = {c: r for r, c in enumerate(torch.nonzero(visual_mask[0]).flatten().tolist())} if visual_mask is not None else {}

    def masks_for(columns):
        q = torch.tensor(columns)
        allowed = q.unsqueeze(0) <= q.unsqueeze(1)
        hidden_from_new = torch.tensor([c in dropped_llm for c in columns]).unsqueeze(0) & (q >= prompt_len).unsqueeze(1)
        return (allowed & ~hidden_from_new).view(1, 1, len(columns), len(columns))

    final_prompt = sum(1 for c in cols if c < prompt_len and c not in dropped_llm)

    def rope_for(h, columns):
        if positions_mode == "contiguous":  # (prompt columns come first: columns are ascending)
            pos = torch.tensor([[j if c < prompt_len else final_prompt + c - prompt_len for j, c in enumerate(columns)]])
        else:
            pos = positions[..., columns]
        return lm.rotary_emb(h, pos)

    h = embeds[cols].unsqueeze(0)
    mask, rope = masks_for(cols), rope_for(h, cols)
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i in stages:
                gone = set(entering) - set(stages[i])
                keep_idx = [j for j, c in enumerate(cols) if c not in gone]
                cols = [cols[j] for j in keep_idx]
                h = h[:, keep_idx]
                mask, rope = masks_for(cols), rope_for(h, cols)
            h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=None,
                      use_cache=False)
            if isinstance(h, tuple):
                h = h[0]
            if deepstack is not None and i < len(deepstack):
                h = h.clone()
                for j, c in enumerate(cols):
                    if c in rank:
                        h[0, j] += deepstack[i][rank[c]]
        logits = model.lm_head(lm.norm(h))[0]
    return logits, cols
