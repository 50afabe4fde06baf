"""Accuracy of the demo model on scene questions (greedy one-word answers), per question type."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from .tokenizer import prompt

# keep_fn(example_index, image_features) -> indices of the projected visual tokens to keep, where
# image_features is the (576, D) projector output of that example's image.
KeepFn = Callable[[int, torch.Tensor], torch.Tensor]


def random_keep(k: int, seed: int = 0) -> KeepFn:
    """A ``keep_fn`` keeping a seeded random ``k`` of the visual tokens (per example, reproducible)."""

    def keep(index: int, features: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return torch.randperm(features.shape[0], generator=g)[:k].sort().values

    return keep


def _pruned_logits(model, inputs, keep_fn: KeepFn, offset: int, pad_id: int) -> torch.Tensor:
    """Last-position logits with only the kept visual tokens in the sequence (other <image>
    placeholders deleted from input_ids), left-padded again."""
    image_id = model.config.image_token_id
    feats = model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    embed = model.get_input_embeddings()
    rows, masks = [], []
    for b, ids in enumerate(inputs["input_ids"]):
        f = feats[b].reshape(-1, feats[b].shape[-1])
        keep = torch.as_tensor(keep_fn(offset + b, f), dtype=torch.long, device=f.device).flatten().sort().values
        real = inputs["attention_mask"][b].bool()
        ids = ids[real]
        pos = (ids == image_id).nonzero().flatten()
        drop = torch.ones(len(pos), dtype=torch.bool, device=ids.device)
        drop[keep] = False
        keep_tok = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        keep_tok[pos[drop]] = False
        ids = ids[keep_tok]
        e = embed(ids)
        e[ids == image_id] = f[keep].to(e.dtype)
        rows.append(e)
    length = max(len(r) for r in rows)
    dim = rows[0].shape[-1]
    embeds = rows[0].new_zeros(len(rows), length, dim)
    pad = embed(torch.tensor([pad_id], device=embeds.device))[0]
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
    for b, r in enumerate(rows):
        embeds[b, : length - len(r)] = pad
        embeds[b, length - len(r):] = r
        mask[b, length - len(r):] = 1
    return model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1).logits[:, -1]


@torch.no_grad()
def evaluate(model, processor, examples, keep_fn: KeepFn | None = None, batch_size: int = 16,
             progress: bool = False) -> dict:
    """``{"overall": %, "<qtype>": %, ..., "n": count}``; the answer is the first generated word.

    Greedy decoding, batched with left padding. The vocabulary is word-level and every answer is one
    word, so the first generated word is the arg-max of the first decoding step; that single forward
    is what is computed (identical to ``generate(max_new_tokens=1..3)``'s first word, faster).
    ``keep_fn`` (see :data:`KeepFn`) prunes the visual tokens before the LLM without the library:
    the unkept ``<image>`` placeholders are deleted from the sequence.
    """
    from tqdm import tqdm

    tok = processor.tokenizer
    correct, total = defaultdict(int), defaultdict(int)
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc="scenes", disable=not progress):
        chunk = examples[start:start + batch_size]
        inputs = processor(images=[e.image() for e in chunk], text=[prompt(e.question) for e in chunk],
                           return_tensors="pt", padding=True).to(model.device)
        if keep_fn is None:
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        else:
            logits = _pruned_logits(model, inputs, keep_fn, start, tok.pad_token_id)
        words = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for e, w in zip(chunk, words):
            total[e.qtype] += 1
            correct[e.qtype] += int(w == e.answer)
    result = {q: 100.0 * correct[q] / total[q] for q in sorted(total)}
    result["overall"] = 100.0 * sum(correct.values()) / max(1, sum(total.values()))
    result["n"] = sum(total.values())
    return result
