"""Serving integrations. ``vtprune[vllm]`` installs a vLLM plugin (entry-point group
``vllm.general_plugins``, name ``vtprune``) whose :func:`register` adds pruning variants of vLLM's
LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL and Qwen3-VL models. Nothing here imports vLLM until vLLM calls
:func:`register`; see ``docs/vllm.md``.
"""
from __future__ import annotations


def register() -> None:
    """vLLM general-plugin hook (runs in every vLLM process)."""
    from .vllm_plugin import register as _register

    _register()


__all__ = ["register"]
