"""Parity runner for OC-VTP (tests/fixtures/parity/ocvtp.json).

Weights: the pruner and the training decoder get deterministic weights from a seeded generator, filled
in sorted state-dict order (:func:`seeded_weights`), so the fixture depends on no shipped checkpoint.
The scratch script that produced the fixture copied the same tensors into the public code's modules.

Two case kinds:

- ``select``: the feature layer's patch tokens of ``inputs.make`` stand in for the pruner's input (the
  middle block) too; the fill score is the feature layer's attention, mean over heads and over all
  queries (the ``received_attention`` provider). The method runs with its defaults and
  ``seed=args["noise_seed"]``: slot noise drawn from a generator seeded with it, the public code's
  ``randn_like`` after ``torch.manual_seed(noise_seed)``.
- ``loss``: pruner + decoder on the patch tokens, unmasked (the public code's eval mode), slot noise
  passed explicitly; returns the area-weighted MSE.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from vtprune.methods import make_method
from vtprune.methods.base import ImageContext
from vtprune.ocvtp.decoder import OCVTPModel, SlotDecoder
from vtprune.ocvtp.pruner import PrunerConfig, SlotPruner, save_pruner

from . import inputs

SLOT_DIM = 32
WEIGHT_SEED = 1234
_CHECKPOINTS: dict[int, Path] = {}


def seeded_weights(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights for every tensor of ``module``'s state dict (sorted by name): matrices
    N(0, 1/fan_in), norm weights 1 + 0.1·N, biases and vectors 0.1·N, position tables N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sorted(module.state_dict().items()):
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if t.dim() >= 2 and "position" not in name:
            out[name] = noise / math.sqrt(t.shape[-1])
        elif "norm" in name and name.endswith("weight"):
            out[name] = 1.0 + 0.1 * noise
        elif "position" in name:
            out[name] = noise
        else:
            out[name] = 0.1 * noise
    return out


def pruner_config(dim: int) -> PrunerConfig:
    return PrunerConfig(input_dim=dim, slot_dim=SLOT_DIM, layer=9)


def seeded_pruner(dim: int) -> SlotPruner:
    pruner = SlotPruner(pruner_config(dim))
    pruner.load_state_dict(seeded_weights(pruner, WEIGHT_SEED))
    return pruner.eval()


def seeded_decoder(dim: int, n: int) -> SlotDecoder:
    decoder = SlotDecoder(dim, n, SLOT_DIM)
    decoder.load_state_dict(seeded_weights(decoder, WEIGHT_SEED + 1))
    return decoder.eval()


def _checkpoint(dim: int) -> Path:
    if dim not in _CHECKPOINTS:
        folder = Path(tempfile.mkdtemp(prefix="vtprune-parity-ocvtp-"))
        save_pruner(seeded_pruner(dim), folder)
        _CHECKPOINTS[dim] = folder
    return _CHECKPOINTS[dim]


def image_context(x: dict[str, torch.Tensor]) -> ImageContext:
    patches = x["features"][1:]
    n = patches.shape[0]
    side = math.isqrt(n)
    received = x["attention"].mean(0).mean(0)[1:]  # head mean, query mean, patch columns
    providers = {"received_attention": lambda: received, "hidden": lambda layer: patches}
    return ImageContext(features=patches, grids=[(side, side)], crop_slices=[slice(0, n)], family="llava",
                        image_index=0, providers=providers)


def run_select(case: dict) -> dict:
    x = inputs.make(**case["inputs"])
    args = case["args"]
    method = make_method("ocvtp", keep=args["keep"], seed=args["noise_seed"],
                         checkpoint=str(_checkpoint(x["features"].shape[1])))
    keep = method.select_vision(image_context(x)).keep
    return {"keep": keep, "count": int(keep.numel())}


def run_loss(case: dict) -> dict:
    x = inputs.make(**case["inputs"])
    tokens = x["features"][1:].unsqueeze(0)
    dim, n = tokens.shape[2], tokens.shape[1]
    k = case["args"]["slots"]
    epsilon = torch.randn(1, k, SLOT_DIM, generator=torch.Generator().manual_seed(case["args"]["noise_seed"]))
    model = OCVTPModel(seeded_pruner(dim), seeded_decoder(dim, n)).eval()
    with torch.no_grad():
        loss = model(tokens, k, mask=False, epsilon=epsilon).mean()
    return {"loss": loss.reshape(1)}


def run(case: dict) -> dict:
    return run_loss(case) if case["kind"] == "loss" else run_select(case)
