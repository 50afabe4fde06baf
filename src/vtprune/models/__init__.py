"""Model adapters: one file per model family."""
from .base import Adapter, adapter_for, family_of, supported_classes

__all__ = ["Adapter", "adapter_for", "family_of", "supported_classes"]
