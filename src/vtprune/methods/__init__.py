"""Pruning methods: one file per method, each added to the registry by ``@register_method``."""
from .base import (LLMContext, ImageContext, Method, Selection, Stage, available_methods, make_method,
                   method_class, register_method, sorted_topk, split_budget)

__all__ = ["Method", "Selection", "Stage", "ImageContext", "LLMContext", "available_methods",
           "make_method", "method_class", "register_method", "sorted_topk", "split_budget"]
