"""The shipped demo model: a small LLaVA-format VLM trained by the project on generated scenes.

``load_demo_model()`` loads it from the package (no download); ``scenes`` generates the images and
questions; ``bench.evaluate`` measures accuracy; ``train`` reproduces the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"


def load_demo_model(device: str = "cpu"):
    """(model, processor) of the shipped scenes model, in eval mode."""
    if not (MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"The demo checkpoint is missing from {MODEL_DIR}. Reinstall vtprune, or train it with the "
            f"three stages of `python -m vtprune.demo.train` (see its --help).")
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR).to(device).eval()
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    return model, processor
