"""vtprune's own evaluation of scenes questions, without lmms-eval: the reference the lmms-eval
runs must reproduce.

* ``vtprune.demo.bench.evaluate`` (the demo package's accuracy: batched, one greedy step, the first
  generated word against the answer) gives the accuracy when the demo package ships it;
* a plain loop (one question at a time, the model's chat template, greedy ``generate``) gives the
  per-question answers, and its own first-word accuracy where there is no bench.
"""
from __future__ import annotations

import string

_STRIP = string.whitespace + string.punctuation


def _image(example):
    return example.image() if callable(example.image) else example.image


def _first_word(text: str) -> str:
    words = text.lower().split()
    return words[0].strip(_STRIP) if words else ""


def bench_evaluate():
    try:
        from vtprune.demo import bench
    except ImportError:
        return None
    return getattr(bench, "evaluate", None)


def own_evaluation(path: str, examples, max_new_tokens: int, method: str | None = None, use_bench: bool = True,
                   **method_args) -> tuple[float, list[str], float | None]:
    """(loop accuracy, loop answers, bench accuracy or None) of the model at ``path`` on ``examples``,
    unpruned or pruned by ``method`` (the bench needs the demo model's prompt format: LLaVA)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vtprune

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    handle = vtprune.apply(model, method, **method_args) if method else None
    predictions = []
    try:
        for ex in examples:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}]
            prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = processor(images=_image(ex), text=prompt, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1]:].tolist()
            special = set(processor.tokenizer.all_special_ids)  # an answer ends at a special token
            new = new[:next((k for k, t in enumerate(new) if t in special), len(new))]
            predictions.append(processor.tokenizer.decode(new, skip_special_tokens=True))
        bench = bench_evaluate() if use_bench else None
        bench_accuracy = None
        if bench is not None:
            result = bench(model, processor, list(examples))
            bench_accuracy = float(result["overall"]) / 100.0
    finally:
        if handle is not None:
            handle.remove()
    accuracy = sum(_first_word(p) == ex.answer for p, ex in zip(predictions, examples)) / len(examples)
    return accuracy, predictions, bench_accuracy
