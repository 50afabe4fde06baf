"""Shared fixtures for the vLLM plugin tests (run in the vLLM venv, see .ci/vllm.sh).

CPU only, no downloads: tiny checkpoints are written to a temporary folder (``tiny_checkpoints``),
vLLM runs fp32, eager, with a 1 GiB KV cache.
"""
from __future__ import annotations

import contextlib
import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import numpy as np
import pytest
from PIL import Image

from tiny_checkpoints import build

ARCH = {"llava": "VTPruneLlavaForConditionalGeneration", "llava_next": "VTPruneLlavaNextForConditionalGeneration",
        "qwen2_5_vl": "VTPruneQwen2_5_VLForConditionalGeneration", "qwen3_vl": "VTPruneQwen3VLForConditionalGeneration",
        "llava_onevision": "VTPruneLlavaOnevisionForConditionalGeneration"}
HF_CLASS = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
            "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
            "llava_onevision": "LlavaOnevisionForConditionalGeneration"}
#: image sizes (width, height) per family: several aspect ratios where the family has dynamic layouts
SIZES = {"llava": [(112, 112), (112, 112)], "llava_next": [(112, 112), (140, 84), (84, 140)],
         "qwen2_5_vl": [(224, 224), (280, 168)], "qwen3_vl": [(256, 256), (320, 192)],
         "llava_onevision": [(140, 112), (140, 84), (84, 140), (56, 112)]}  # vLLM caps OneVision at 1153×944's count
NEW_TOKENS = 8


def image(seed: int, size=(112, 112)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtprune-vllm")
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = str(build(family, root / family))
        return cache[family]

    return get


def check_plugin_installed() -> None:
    from importlib.metadata import entry_points

    names = [e.value for e in entry_points(group="vllm.general_plugins")]
    if "vtprune.serving:register" not in names:
        pytest.fail("the vtprune vLLM plugin entry point is not installed: pyproject.toml needs "
                    '[project.entry-points."vllm.general_plugins"] vtprune = "vtprune.serving:register" '
                    "(then reinstall vtprune into the vLLM venv).")


@contextlib.contextmanager
def engine(path: str, **kwargs):
    """A vLLM LLM on the CPU (fp32, eager, small), shut down afterwards."""
    from vllm import LLM

    check_plugin_installed()
    args = dict(model=path, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4, seed=0,
                limit_mm_per_prompt={"image": 2})
    args.update(kwargs)
    llm = LLM(**args)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy():
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


class HFRunner:
    """The same checkpoint in transformers, with and without ``vtprune.apply``."""

    def __init__(self, family: str, path: str):
        import torch
        import transformers
        from transformers import AutoProcessor

        self.family = family
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = getattr(transformers, HF_CLASS[family]).from_pretrained(path, dtype=torch.float32).eval()

    def prompt(self, images: int = 1, question: str = "what color is the circle ?") -> str:
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def generate(self, prompt: str, images, method: str | None = None, **method_args):
        """(new tokens, how much shorter the prompt got: visual tokens pruned, less test-time registers
        added): greedy, with ``vtprune.apply`` when ``method``."""
        import torch
        import vtprune

        inputs = self.processor(images=images, text=prompt, return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            if method is None:
                return self.model.generate(**inputs, **kwargs)[0, length:].tolist(), 0
            anyres = self.model.config.model_type in ("llava_next", "llava_onevision")
            layout = {"layout": "model"} if anyres else {}  # vLLM's layout
            # the vLLM variants keep every kept token at its original position (docs/vllm.md)
            with vtprune.pruned(self.model, method, positions="original", **layout, **method_args) as handle:
                out = self.model.generate(**inputs, **kwargs)
                pruned = sum(im.candidates - im.after_pre_llm - im.registers for im in handle.stats[0].images)
        return out[0, length:].tolist(), pruned
