"""vtprune: visual-token pruning for vision-language models on Hugging Face transformers."""
from .api import PruneHandle, apply, pruned
from .errors import (AlreadyPrunedError, ArgumentError, BudgetError, InputError, UnboundMethodError,
                     UnknownMethodError, UnsupportedMethodError, UnsupportedModelError, VTPruneError)
from .methods import Method, Selection, Stage, available_methods, make_method, register_method

__version__ = "0.1.0"

__all__ = ["apply", "pruned", "PruneHandle", "Method", "Selection", "Stage", "available_methods", "make_method",
           "register_method", "VTPruneError", "ArgumentError", "AlreadyPrunedError", "BudgetError", "InputError",
           "UnboundMethodError", "UnknownMethodError", "UnsupportedMethodError", "UnsupportedModelError"]
