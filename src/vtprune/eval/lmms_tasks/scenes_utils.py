"""Functions named by ``vtprune_scenes.yaml``: the image, the question, exact-match scoring.

The scenes questions have one-word answers (a colour, a shape, a number word, yes/no, or
left/right/above/below). As in vtprune's own evaluation (``vtprune.demo.bench.evaluate``: "the
answer is the first generated word"), the prediction is the first word of the greedy answer, lower-cased and stripped of
punctuation; it is correct when it equals the answer.
"""
from __future__ import annotations

import string

_STRIP = string.whitespace + string.punctuation


def normalize_answer(text: str) -> str:
    """Lower case, no surrounding white space or punctuation, inner white space collapsed."""
    return " ".join(str(text).lower().strip(_STRIP).split())


def first_word(text: str) -> str:
    """The first white-space delimited word, lower-cased, without punctuation ("" if it is only
    punctuation: a leading "?" is a wrong first word, as in vtprune's own evaluation)."""
    words = str(text).split()
    return words[0].lower().strip(_STRIP) if words else ""


def is_correct(prediction: str, answer: str) -> bool:
    return first_word(prediction) == normalize_answer(answer)


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc, results):
    prediction = results[0] if results else ""
    return {"exact_match": 1.0 if is_correct(prediction, doc["answer"]) else 0.0}
