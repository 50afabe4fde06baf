"""Model adapters and family declarations: one file per model family, registered in :mod:`.families`."""
from .base import Adapter, adapter_for, family_of, supported_classes
from .families import Family, all_families, family_of_model

__all__ = ["Adapter", "Family", "adapter_for", "all_families", "family_of", "family_of_model", "supported_classes"]
