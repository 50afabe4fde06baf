"""Accuracy at scale through lmms-eval (the optional ``lmms`` extra).

Nothing here imports lmms-eval at import time, so ``import vtprune.eval`` works without the extra.

* ``vtprune.eval.lmms_model.VTPruneLMM`` -- the lmms-eval model ``vtprune``: any supported HF VLM
  from a local path, pruned by a vtprune method given in ``--model_args``.
* :func:`lmms_manifest` -- the payload of the ``lmms_eval.models`` entry point that registers it
  (declared in vtprune's ``pyproject.toml``); :func:`register` does the same at run time.
* ``vtprune.eval.export_scenes`` -- writes the shipped scenes benchmark as a local lmms-eval task
  folder (``vtprune_scenes``) for ``--include_path``.
* ``vtprune.eval.cli`` -- ``vtprune eval``, a thin front end over lmms-eval's evaluator.

See ``docs/lmms-eval.md``.
"""
from __future__ import annotations

from pathlib import Path

MODEL_NAME = "vtprune"
MODEL_CLASS_PATH = "vtprune.eval.lmms_model.VTPruneLMM"
TASKS_DIR = Path(__file__).resolve().parent / "lmms_tasks"
SCENES_TASK = "vtprune_scenes"

__all__ = ["MODEL_NAME", "MODEL_CLASS_PATH", "TASKS_DIR", "SCENES_TASK", "lmms_manifest", "register",
           "is_registered"]


def lmms_manifest():
    """Entry-point payload for lmms-eval's ``lmms_eval.models`` group (a ``ModelManifest``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)


def is_registered() -> bool:
    """Whether lmms-eval's model registry already knows ``vtprune`` (e.g. through the entry point)."""
    from lmms_eval import models

    return MODEL_NAME in models.MODEL_REGISTRY_V2.list_model_names()


def register() -> None:
    """Register the ``vtprune`` model with lmms-eval in this process.

    Needed only where the package's entry point is not installed (e.g. running from a source tree
    that was not pip-installed); idempotent.
    """
    from lmms_eval import models

    if not is_registered():
        models.MODEL_REGISTRY_V2.register_manifest(lmms_manifest())
    models.AVAILABLE_MODELS.setdefault(MODEL_NAME, MODEL_CLASS_PATH.rsplit(".", 1)[-1])
