"""Pruning methods: one file per method. Import this package to register all of them."""
from .base import (LLMContext, ImageContext, Method, Selection, Stage, available_methods, make_method,
                   method_class, register, sorted_topk, split_budget)

__all__ = ["Method", "Selection", "Stage", "ImageContext", "LLMContext", "available_methods",
           "make_method", "method_class", "register", "sorted_topk", "split_budget"]
