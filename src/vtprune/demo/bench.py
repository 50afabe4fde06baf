"""Accuracy of the demo model on scene questions (greedy one-word answers), per question type."""
from __future__ import annotations

from collections import defaultdict

import torch

from .tokenizer import prompt


@torch.no_grad()
def evaluate(model, processor, examples, batch_size: int = 16, progress: bool = False) -> dict:
    """``{"overall": %, "<qtype>": %, ..., "n": count}``; the answer is the first generated word."""
    from tqdm import tqdm

    tok = processor.tokenizer
    correct, total = defaultdict(int), defaultdict(int)
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc="scenes", disable=not progress):
        chunk = examples[start:start + batch_size]
        inputs = processor(images=[e.image() for e in chunk], text=[prompt(e.question) for e in chunk],
                           return_tensors="pt", padding=True).to(model.device)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        words = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for e, w in zip(chunk, words):
            total[e.qtype] += 1
            correct[e.qtype] += int(w == e.answer)
    result = {q: 100.0 * correct[q] / total[q] for q in sorted(total)}
    result["overall"] = 100.0 * sum(correct.values()) / max(1, sum(total.values()))
    result["n"] = sum(total.values())
    return result
