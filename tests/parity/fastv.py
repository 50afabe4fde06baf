"""Parity runner for ``fastv`` (fixture: tests/fixtures/parity/fastv.json)."""
from __future__ import annotations

from vtprune.methods.fastv import FastV

from .llm_runner import context, sample


def run(case: dict) -> dict:
    selection = FastV(**case["args"]).select_llm(context(sample(case)))
    return {"keep": selection.keep.sort().values, "count": selection.keep.numel()}
