"""OC-VTP: object-centric vision token pruning with a small trained slot-attention pruner.

Li, Zhao, Deng, Wang, Pajarinen, "Object-Centric Vision Token Pruning for Vision Language Models",
arXiv 2511.20439 (public code: github.com/GarryLarry010131/OC-VTP; re-implemented, not copied).

* :mod:`.pruner`  the pruner (inference part), selection rule, strict safetensors checkpoints;
* :mod:`.decoder` the training-only masked slot decoder and the area-weighted MSE;
* :mod:`.extract` middle-layer features of a VLM's own vision tower, stored as fp16 shards;
* :mod:`.train`   training with ``accelerate`` (multi-GPU, resumable, loss curves);
* :mod:`.cli`     ``vtprune ocvtp extract|train``.

The inference method is ``vtprune.apply(model, "ocvtp", keep=64, checkpoint=PATH)``
(:mod:`vtprune.methods.ocvtp`).
"""
from .pruner import (CheckpointError, PrunerConfig, SlotPruner, load_pruner, save_pruner,
                     select_from_attention)

__all__ = ["CheckpointError", "PrunerConfig", "SlotPruner", "load_pruner", "save_pruner", "select_from_attention",
           "checkpoint_dir", "shipped_checkpoints"]


def checkpoint_dir():
    """The folder of the checkpoints shipped with vtprune."""
    from pathlib import Path

    return Path(__file__).parent / "checkpoints"


def shipped_checkpoints() -> dict:
    """name → PrunerConfig of every checkpoint shipped with vtprune."""
    from .pruner import CONFIG_NAME, read_config

    root = checkpoint_dir()
    if not root.is_dir():
        return {}
    return {p.name: read_config(p) for p in sorted(root.iterdir()) if (p / CONFIG_NAME).is_file()}
