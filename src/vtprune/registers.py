"""Test-time registers for Hugging Face vision towers.

After Jiang et al., "Vision Transformers Don't Need Trained Registers" (NeurIPS 2025, arXiv 2506.08010),
as used by OccamToken (arXiv 2605.29657, Sec. 3.1 and App. A "Register construction").

High-norm *outlier tokens* of a ViT (attention sinks) are produced by a few sparse MLP neurons
("register neurons"). A test-time register is one extra token, appended to the patch sequence, onto
which those neurons' activations are moved: the sink then forms on the register instead of on
(background) patches, and the register scores inside the same softmax as the patches, which is what
OccamToken's thresholds compare against.

This module offers

* :func:`calibrate_register_neurons` — find the register neurons of a tower from ~100–500 images;
* :class:`RegisterNeurons` — the result, JSON round-trippable, keyed to the tower's weights through
  :func:`tower_identity`; :func:`load_or_calibrate` caches it under ``~/.cache/vtprune/registers/``
  (``$VTPRUNE_CACHE/registers/`` when the environment variable ``VTPRUNE_CACHE`` is set), one file per
  tower and settings; :func:`latest_calibration` is the newest of a tower's, whatever its settings
  (what OccamToken uses when given no neurons);
* :func:`test_time_register` — a context manager that appends the register and redirects the neurons
  while the tower runs (hooks only; nothing in the model is changed);
* :func:`effective_attended_tokens` / :func:`register_diagnostic` — the paper's sanity number
  ``n_eff = exp(H(CLS attention))`` (42 → 281 on LLaVA-1.5's CLIP) with and without the register;
* :func:`add_calibrate_registers_arguments` / :func:`calibrate_registers_cli` — the ``calibrate``
  command of the CLI.

Supported towers: CLIP (``CLIPVisionModel`` of transformers 5, as inside LLaVA-1.5 / LLaVA-NeXT), and
the Qwen2.5-VL / Qwen3-VL vision towers, where the register is 4 copies (one 2×2 merge group) per image
threaded through the packed ``cu_seqlens`` / rotary / window-index / merger logic (see
:class:`vtprune.models.qwen2_5_vl.QwenTower`). The CLS diagnostics are CLIP-only (Qwen towers have no CLS token).
The tower adapters (:class:`_Tower` subclasses) live with their model families (``Family.register_tower``
in ``vtprune/models/``); this module finds them through the family registry.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .errors import InputError, UnsupportedModelError

__all__ = [
    "RegisterNeurons",
    "tower_identity",
    "calibrate_register_neurons",
    "auto_outlier_threshold",
    "first_outlier_block",
    "default_cache_dir",
    "cache_path",
    "cached_calibrations",
    "latest_calibration",
    "load_or_calibrate",
    "test_time_register",
    "redirect_activations",
    "cls_attention_probs",
    "effective_attended_tokens",
    "register_diagnostic",
    "load_vision_tower",
    "add_calibrate_registers_arguments",
    "calibrate_registers_cli",
]

FORMAT_VERSION = 1
MODES = ("per_channel", "signed_max")


# ================================================================================================
# The result
# ================================================================================================
@dataclass
class RegisterNeurons:
    """The register neurons of one vision tower.

    neurons:         (layer, neuron) pairs, best first; layer = block index (0-based), neuron =
                     channel of that block's MLP activation (width = intermediate size).
    threshold:       the output-norm threshold that marked outlier tokens (None: none could be chosen).
    detection_layer: the block (0-based, resolved) whose output norms marked the outliers.
    tower:           :func:`tower_identity` of the tower it was calibrated on ("" = unknown).
    scores:          mean |activation| at outlier positions of each listed neuron, same order.
    message:         why the list is empty, or other notes (empty when all went well).
    settings:        the calibration settings (top_k, highest_layer, sparsity, threshold rule, ...).
    stats:           counts: images seen, images with outliers, outlier tokens per image, ...
    """

    neurons: list[tuple[int, int]] = field(default_factory=list)
    threshold: float | None = None
    detection_layer: int = -1
    tower: str = ""
    scores: list[float] = field(default_factory=list)
    message: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.neurons = [(int(layer), int(n)) for layer, n in self.neurons]
        self.scores = [float(s) for s in self.scores]

    @property
    def found(self) -> bool:
        """True when at least one neuron is listed (an empty list still appends the register)."""
        return bool(self.neurons)

    def by_layer(self) -> dict[int, list[int]]:
        """``{layer: [neurons]}`` in ascending layer order, neurons in listed order, no duplicates."""
        out: dict[int, list[int]] = {}
        for layer, n in self.neurons:
            lst = out.setdefault(layer, [])
            if n not in lst:
                lst.append(n)
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["neurons"] = [list(p) for p in self.neurons]
        d["format"] = FORMAT_VERSION
        d["kind"] = "vtprune.register_neurons"
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The JSON text; also written to ``path`` when given (atomically)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False, allow_nan=False)
        if path is not None:
            _atomic_write(Path(path), text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RegisterNeurons":
        fmt = d.get("format", FORMAT_VERSION)
        if fmt > FORMAT_VERSION:
            raise InputError(f"Register-neuron file format {fmt} is newer than this vtprune ({FORMAT_VERSION}); "
                             "upgrade vtprune or recalibrate.")
        if "neurons" not in d:
            raise InputError("Not a register-neuron file: it has no 'neurons' entry.")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "RegisterNeurons":
        """From JSON text, or from the path of a JSON file."""
        if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            path = Path(source)
            if not path.is_file():
                raise InputError(f"Register-neuron file {str(path)!r} does not exist.")
            source = path.read_text()
        try:
            d = json.loads(source)
        except json.JSONDecodeError as e:
            raise InputError(f"Register-neuron JSON could not be parsed: {e}") from None
        return cls.from_dict(d)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _as_neurons(neurons: Any) -> RegisterNeurons:
    """RegisterNeurons from a RegisterNeurons, a list of (layer, neuron) pairs, a {layer: [n]} dict,
    a JSON path, or None (= no neurons: the register is appended and nothing is redirected)."""
    if neurons is None:
        return RegisterNeurons([], message="no neurons given")
    if isinstance(neurons, RegisterNeurons):
        return neurons
    if isinstance(neurons, (str, os.PathLike)):
        return RegisterNeurons.from_json(neurons)
    if isinstance(neurons, Mapping):
        return RegisterNeurons([(int(layer), int(n)) for layer, ns in neurons.items() for n in ns])
    return RegisterNeurons([(int(p[0]), int(p[1])) for p in neurons])


# ================================================================================================
# Tower adapters: where the layers, the MLP activation and the token layout live
# ================================================================================================
def _mlp_site(block: nn.Module) -> nn.Module:
    """The module whose *input* is the MLP activation (output of the activation function, width =
    intermediate size): CLIP ``fc2``; Qwen3-VL ``linear_fc2``; Qwen2.5-VL ``down_proj`` (input =
    act(gate)·up, the gated analogue)."""
    mlp = block.mlp
    for name in ("fc2", "linear_fc2", "down_proj"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise UnsupportedModelError(f"Cannot find the MLP output projection of {type(block).__name__}.")


def _first_param(module: nn.Module) -> torch.nn.Parameter:
    return next(module.parameters())


class _Tower:
    """What calibration and the intervention need to know about a tower family."""

    kind = ""
    has_cls = False
    register_copies = 1  # register tokens appended per image (Qwen: 4 = one 2×2 merge group)
    batched = False  # hidden states are (B, S, D) per image batch (calibration may micro-batch them)

    def __init__(self, core: nn.Module):
        self.core = core

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether ``module`` is a vision tower of this kind."""
        return False

    def processor_batch(self, out: Mapping[str, Any]) -> Any:
        """The calibration batch of an image processor's output."""
        return out["pixel_values"]

    @property
    def config(self):
        return self.core.config

    @property
    def layers(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def site(self, layer: int) -> nn.Module:
        return _mlp_site(self.layers[layer])

    @property
    def intermediate_size(self) -> int:
        return int(self.site(0).in_features)

    def prepare(self, batch: Any) -> dict[str, Any]:
        raise NotImplementedError

    def num_images(self, batch: dict[str, Any]) -> int:
        raise NotImplementedError

    def run(self, batch: dict[str, Any]) -> Any:
        raise NotImplementedError

    def split(self, t: torch.Tensor, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Per-image (S_i, C) views of a recorded (B, S, C) or packed (S, C) tensor."""
        raise NotImplementedError

    def identity_fields(self) -> list[str]:
        c = self.config
        layers = getattr(c, "num_hidden_layers", None) or getattr(c, "depth", None)
        parts = [str(getattr(c, "model_type", type(self.core).__name__)), f"h{c.hidden_size}", f"l{layers}"]
        if getattr(c, "image_size", None):
            parts.append(f"img{c.image_size}")
        parts.append(f"p{c.patch_size}")
        return parts

    def identity_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    # -- intervention (families that support it override these) -------------------------------
    def append_register_hook(self) -> torch.utils.hooks.RemovableHandle:
        raise UnsupportedModelError(
            f"Test-time registers are not implemented for {self.kind} vision towers yet (they need "
            f"{self.register_copies} register copies per image threaded through the packed sequence); "
            "calibration and tower_identity work.")

    def redirect(self, h: torch.Tensor, channels: torch.Tensor, mode: str) -> torch.Tensor:
        raise UnsupportedModelError(f"Test-time registers are not implemented for {self.kind} towers yet.")

    def cls_attention(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModelError(f"{self.kind} towers have no CLS token.")


class _Handles:
    """Several hook handles removed together."""

    def __init__(self, handles):
        self.handles = list(handles)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _insert_after_segments(t: torch.Tensor, sizes: Sequence[int], copies: int, fill: float = 0, dim: int = 0):
    """Insert ``copies`` rows of ``fill`` after each segment (of the given sizes) along ``dim``."""
    parts = []
    for seg in t.split([int(n) for n in sizes], dim=dim):
        shape = list(seg.shape)
        shape[dim] = copies
        parts += [seg, torch.full(shape, fill, dtype=seg.dtype, device=seg.device)]
    return torch.cat(parts, dim=dim)


def _tower_classes() -> list[type[_Tower]]:
    """The tower adapters the model families declare (``Family.register_tower``), each once."""
    from .models.families import all_families

    out: list[type[_Tower]] = []
    for fam in all_families():
        if fam.register_tower is not None and fam.register_tower not in out:
            out.append(fam.register_tower)
    return out


def _tower_names() -> str:
    from .models.families import all_families

    return ", ".join(f.display_name for f in all_families() if f.register_tower is not None)


def _resolve_tower(model: nn.Module, _depth: int = 0) -> _Tower:
    """The tower adapter of a vision tower, or of a VLM that holds one."""
    if isinstance(model, _Tower):
        return model
    for cls in _tower_classes():
        if cls.matches(model):
            return cls(model)
    if _depth < 4:
        for name in ("vision_model", "vision_tower", "visual", "model"):
            sub = getattr(model, name, None)
            if isinstance(sub, nn.Module):
                try:
                    return _resolve_tower(sub, _depth + 1)
                except UnsupportedModelError:
                    pass
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a supported vision tower (those of {_tower_names()}) and holds none.")


def tower_identity(tower: nn.Module) -> str:
    """A stable string naming the tower's architecture and its exact weights, e.g.
    ``clip_vision_model-h1024-l24-img336-p14-3fa9c2e01b7d``.

    The architecture part comes from the config (model_type, hidden size, layers, image size, patch
    size); the suffix is a 12-hex SHA-256 of a few weight tensors (patch embedding, class / position
    embeddings, first fc1 / last fc2 weight, every layer's fc1 bias for CLIP; the analogues for Qwen),
    taken in bfloat16 so that the same checkpoint loaded in fp32, fp16 or bf16, on any device, gives
    the same identity.
    """
    t = _resolve_tower(tower)
    h = hashlib.sha256()
    for w in t.identity_tensors():
        if w is None:
            continue
        if w.is_meta:
            raise InputError("tower_identity needs materialised weights (this tower is on the meta device).")
        x = w.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(str(tuple(x.shape)).encode())
        h.update(x.view(torch.int16).numpy().tobytes())
    return "-".join(t.identity_fields() + [h.hexdigest()[:12]])


# ================================================================================================
# Calibration
# ================================================================================================
def auto_outlier_threshold(norms: torch.Tensor | Sequence[torch.Tensor], max_fraction: float = 0.1,
                           min_ratio: float = 1.25, min_gap_sd: float = 2.0, min_z: float = 5.0) -> float | None:
    """An outlier-norm threshold chosen from the (bimodal) distribution of token norms, or None.

    Rule, on the log-norms ``x`` pooled over the images (CLS excluded by the caller):

    1. sort ``x``; take the median ``m`` and the robust spread ``s = 1.4826 · MAD`` (floored at 1e-6);
    2. look at the gaps between consecutive sorted values that leave at most ``max_fraction`` of the
       tokens above them (outliers are rare: a few per image);
    3. a gap *qualifies* when it is wide — at least ``ln(min_ratio)`` (the token above is ≥ 1.25× the
       norm of the token below) and at least ``min_gap_sd`` robust SDs — and its upper side lies at least
       ``min_z`` robust z-scores above the median (far outside the bulk);
    4. the **lowest** qualifying gap separates the bulk from the high-norm mode (the lowest rather
       than the widest, so that a widely spread outlier mode is taken whole); the threshold is its
       geometric midpoint. No qualifying gap = no outliers: None.
    """
    if isinstance(norms, torch.Tensor):
        x = norms.detach().float().flatten()
    else:
        x = torch.cat([n.detach().float().flatten() for n in norms]) if len(norms) else torch.zeros(0)
    x = x[torch.isfinite(x)]
    n = x.numel()
    if n < 4:
        return None
    x = torch.sort(torch.log(x.clamp_min(1e-12))).values
    m = float(x.median())
    s = max(float(1.4826 * (x - m).abs().median()), 1e-6)
    gaps = x[1:] - x[:-1]  # gap i lies between x[i] and x[i+1]; n-1-i tokens above it
    first = max(0, math.ceil(n * (1.0 - max_fraction)) - 1)
    if first >= n - 1:
        return None
    ok = (gaps >= max(math.log(min_ratio), min_gap_sd * s)) & ((x[1:] - m) / s >= min_z)
    ok[:first] = False
    hits = torch.nonzero(ok).flatten()
    if hits.numel() == 0:
        return None
    i = int(hits[0])
    return float(math.exp(0.5 * (float(x[i]) + float(x[i + 1]))))


def _iter_images(tower: _Tower, images: Iterable[Any], micro_batch: int) -> Iterator[dict[str, Any]]:
    for batch in images:
        b = tower.prepare(batch)
        if tower.batched and micro_batch and b["pixel_values"].shape[0] > micro_batch:
            for chunk in b["pixel_values"].split(micro_batch):
                yield {"pixel_values": chunk}
        else:
            yield b


@contextlib.contextmanager
def _recording(tower: _Tower, act_layers: Iterable[int], out_layers: Iterable[int]):
    """Record MLP activations (input of the MLP output projection) and block outputs."""
    acts: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    handles = []

    def rec_act(layer):
        def hook(module, args):
            acts[layer] = args[0].detach()
        return hook

    def rec_out(layer):
        def hook(module, args, output):
            o = output[0] if isinstance(output, (tuple, list)) else output
            outs[layer] = o.detach()
        return hook

    try:
        for layer in act_layers:
            handles.append(tower.site(layer).register_forward_pre_hook(rec_act(layer)))
        for layer in out_layers:
            handles.append(tower.layers[layer].register_forward_hook(rec_out(layer)))
        yield acts, outs
    finally:
        for h in handles:
            h.remove()


def _outlier_masks(tower: _Tower, out: torch.Tensor, batch, threshold: float) -> list[torch.Tensor]:
    masks = []
    for o in tower.split(out, batch):
        mask = o.float().norm(dim=-1) > threshold
        if tower.has_cls:
            mask[0] = False  # never mark CLS
        masks.append(mask)
    return masks


def _patch_norms(tower: _Tower, out: torch.Tensor, batch) -> list[torch.Tensor]:
    start = 1 if tower.has_cls else 0
    return [o.float().norm(dim=-1)[start:].cpu() for o in tower.split(out, batch)]


def _peak_patch_norms(tower: _Tower, outs: dict[int, torch.Tensor], batch, blocks: Sequence[int]) -> torch.Tensor:
    """(images, blocks): the largest patch-token output norm of each image at each block (CLS excluded)."""
    return torch.stack([torch.stack([n.max() for n in _patch_norms(tower, outs[b], batch)]) for b in blocks], dim=1)


def first_outlier_block(mean_peak_norms: Sequence[float] | torch.Tensor, threshold: float) -> int:
    """The block at which the outliers appear: the first block whose mean peak patch norm (over the
    images with outliers) exceeds the outlier threshold. The reference's rule for ``highest_layer``
    (its ``register_neurons.ipynb``: "set it to the layer at which outliers appear", read off the plot
    of the average max patch norm per layer). The last block if none does (cannot happen when the
    norms include the detection block, where every counted image has a token above the threshold)."""
    peaks = torch.as_tensor(mean_peak_norms, dtype=torch.float64)
    above = torch.nonzero(peaks > threshold).flatten()
    return int(above[0]) if above.numel() else int(peaks.numel()) - 1


@torch.no_grad()
def calibrate_register_neurons(tower: nn.Module, images: Iterable[Any], top_k: int = 10,
                               highest_layer: int | None = None, outlier_threshold: float | None = None,
                               detection_layer: int = -1, sparsity: float = 0.5, progress: bool = True, *,
                               sparsity_activation: float = 0.5, auto_threshold_images: int = 16,
                               micro_batch: int = 4, total_images: int | None = None) -> RegisterNeurons:
    """Find the register neurons of ``tower`` (Jiang et al., Sec. 3; the reference
    ``find_register_neurons`` + ``filter_layers`` + top-k).

    images: an iterable of pixel batches — tensors (B, 3, H, W) (a (3, H, W) image, a LLaVA-NeXT
        (B, crops, 3, H, W) batch: every crop counts as an image) or dicts with ``pixel_values`` (and
        ``image_grid_thw`` for Qwen towers), as the model's image processor returns them.
    top_k: neurons kept (the paper: 10).
    highest_layer: only neurons of blocks ``<= highest_layer`` (0-based; negative counts from the end).
        None (default) = **the block at which the outliers appear** (:func:`first_outlier_block`): the
        first block whose largest patch-token output norm, averaged over the calibration images that
        have outliers, exceeds the outlier threshold. This is the reference's rule (Jiang et al.'s
        ``register_neurons.ipynb``: "Start by setting [highest_layer] to the layer at which outliers
        appear", found from the plot of the average max patch norm per layer; "the attention sinks
        usually show up at the layer after"); its configs hold the values it chose that way: 5 for CLIP
        ViT-B/16 (12 blocks), 17 for DINOv2-L (24 blocks) — no fixed share of the depth. Register neurons *cause*
        the outliers, so they sit at or before that block; later neurons only read the outlier (and
        LLaVA's −2 feature layer never sees last-block neurons). The resolved value is in
        ``settings["highest_layer"]``, the per-block mean peak norms in ``stats["peak_patch_norms"]``.
        [decision] "appear" = the mean peak norm crosses the same threshold that marks outliers at
        ``detection_layer`` (the reference reads the crossing off a plot by eye; one threshold needs no
        new parameter); the mean is over images with outliers only (as the scores are), so that rare
        outliers still count; the block itself is included (its MLP writes the outlier).
    outlier_threshold: output-norm threshold at ``detection_layer`` above which a token is an outlier
        (the reference: 30 for CLIP ViT-B/16). None = automatic: the first ``auto_threshold_images``
        images are run once more to collect norms and :func:`auto_outlier_threshold` picks it.
    detection_layer: the block whose output marks outliers (-1 = last, right for CLIP).
    sparsity: keep only neurons with activation < ``sparsity_activation`` on at least this share of
        the image's tokens (the reference's sparsity filter, 0.5 / 0.5).
    micro_batch: CLIP batches are run in chunks of this many images (the hooks keep one activation
        tensor per block up to ``highest_layer``, or up to ``detection_layer`` while the default is being
        found: memory ≈ chunk × blocks × tokens × intermediate).

    Scoring, per image with at least one outlier token: ``|act[outliers]|.mean(tokens) × sparse``
    for every (block, neuron); averaged over those images; images without outliers are skipped (as
    in the reference). CLS is never an outlier. Returns the top ``top_k`` pairs with a positive score;
    if no image has an outlier the list is empty and ``message`` says why (the register can still
    be appended; nothing is redirected).
    """
    t = _resolve_tower(tower)
    L = t.num_layers
    if not -L <= detection_layer < L:
        raise InputError(f"detection_layer={detection_layer} is outside the tower's {L} blocks.")
    det = detection_layer % L
    auto_layer = highest_layer is None
    if not auto_layer and not -L <= highest_layer < L:
        raise InputError(f"highest_layer={highest_layer} is outside the tower's {L} blocks.")
    hl = None if auto_layer else highest_layer % L
    act_layers = range((det if auto_layer else hl) + 1)  # auto: cut after the pass, at most det
    out_layers = range(det + 1) if auto_layer else (det,)
    if top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}.")
    if not 0.0 <= sparsity <= 1.0:
        raise InputError(f"sparsity must lie in [0, 1], got {sparsity}.")
    was_training = t.core.training
    t.core.eval()
    settings = dict(top_k=top_k, highest_layer=hl, detection_layer=det, sparsity=sparsity,
                    highest_layer_rule="first_outlier_block" if auto_layer else "given",
                    sparsity_activation=sparsity_activation,
                    threshold_rule="given" if outlier_threshold is not None else "auto_lowest_wide_log_gap")

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=total_images, unit="img", desc="register neurons", disable=not progress) if tqdm else None

    stream = _iter_images(t, images, micro_batch)
    buffered: list[dict[str, Any]] = []
    threshold = outlier_threshold
    try:
        if threshold is None:
            norms: list[torch.Tensor] = []
            seen = 0
            for b in stream:
                buffered.append(b)
                with _recording(t, (), (det,)) as (_, outs):
                    t.run(b)
                norms += _patch_norms(t, outs[det], b)
                seen += t.num_images(b)
                if seen >= auto_threshold_images:
                    break
            if seen == 0:
                raise InputError("No calibration images: the images iterable was empty.")
            threshold = auto_outlier_threshold(norms)
            if norms:
                allv = torch.cat(norms)
                settings["norm_quantiles"] = {str(q): float(torch.quantile(allv, q))
                                              for q in (0.5, 0.9, 0.99, 1.0)}
            if threshold is None:
                msg = (f"no outlier tokens: the output norms at block {det} show no clear high-norm mode "
                       "(the gap rule of auto_outlier_threshold found none); pass outlier_threshold=... to "
                       "force one. The register is still appended, but no neurons are redirected.")
                return RegisterNeurons([], None, det, tower_identity(t), [], msg, settings,
                                       {"num_images": seen, "images_with_outliers": 0})

        sums = peak_sums = None
        n_images = n_with = n_outliers = 0

        def batches():
            yield from buffered
            yield from stream

        for b in batches():
            with _recording(t, act_layers, out_layers) as (acts, outs):
                t.run(b)
            masks = _outlier_masks(t, outs[det], b, float(threshold))
            per_layer = {layer: t.split(acts[layer], b) for layer in act_layers}
            peaks = _peak_patch_norms(t, outs, b, out_layers) if auto_layer else None
            for i, mask in enumerate(masks):
                n_images += 1
                k = int(mask.sum())
                if k == 0:
                    continue
                n_with += 1
                n_outliers += k
                if peaks is not None:
                    peak_sums = peaks[i] if peak_sums is None else peak_sums + peaks[i]
                rows = []
                for layer in act_layers:
                    a = per_layer[layer][i].float()
                    sparse = (a < sparsity_activation).sum(0) >= sparsity * a.shape[0]
                    rows.append(a[mask].abs().mean(0) * sparse)
                score = torch.stack(rows)
                sums = score if sums is None else sums + score
            del acts, outs, per_layer
            if bar is not None:
                bar.update(t.num_images(b))
    finally:
        if bar is not None:
            bar.close()
        t.core.train(was_training)

    if n_images == 0:
        raise InputError("No calibration images: the images iterable was empty.")
    stats = {"num_images": n_images, "images_with_outliers": n_with,
             "outliers_per_image": (n_outliers / n_with) if n_with else 0.0}
    ident = tower_identity(t)
    if n_with == 0 or sums is None:
        msg = (f"no outlier tokens: no image had a token with output norm > {threshold:.4g} at block {det}. "
               "The register is still appended, but no neurons are redirected.")
        return RegisterNeurons([], float(threshold), det, ident, [], msg, settings, stats)
    if auto_layer:
        mean_peaks = (peak_sums / n_with).tolist()
        stats["peak_patch_norms"] = mean_peaks
        hl = settings["highest_layer"] = first_outlier_block(mean_peaks, float(threshold))
        sums = sums[:hl + 1]
    mean = (sums / n_with).flatten().cpu()
    order = torch.sort(mean, descending=True, stable=True).indices
    width = sums.shape[1]
    chosen = [int(j) for j in order[:top_k] if float(mean[j]) > 0]
    neurons = [(j // width, j % width) for j in chosen]
    msg = "" if neurons else "outliers were found but no sparse neuron is active on them."
    return RegisterNeurons(neurons, float(threshold), det, ident, [float(mean[j]) for j in chosen], msg,
                           settings, stats)


# ================================================================================================
# Cache
# ================================================================================================
def default_cache_dir() -> Path:
    """``$VTPRUNE_CACHE/registers`` if ``VTPRUNE_CACHE`` is set, else ``~/.cache/vtprune/registers``."""
    root = os.environ.get("VTPRUNE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "vtprune") / "registers"


_CALIB_DEFAULTS = dict(top_k=10, highest_layer=None, outlier_threshold=None, detection_layer=-1, sparsity=0.5)


def cache_path(tower_or_identity: nn.Module | str, cache_dir: str | os.PathLike | None = None,
               **calibrate_kwargs: Any) -> Path:
    """Where :func:`load_or_calibrate` keeps the neurons of this tower and these calibration settings:
    ``<cache_dir>/<identity>-<8-hex hash of the settings>.json``. [decision] the default
    ``highest_layer`` is hashed as its rule's name, so files from before that rule (which searched
    every block) are not taken for today's default by :func:`load_or_calibrate`."""
    ident = tower_or_identity if isinstance(tower_or_identity, str) else tower_identity(tower_or_identity)
    settings = {**_CALIB_DEFAULTS, **{k: v for k, v in calibrate_kwargs.items() if k in _CALIB_DEFAULTS}}
    if settings["highest_layer"] is None:  # the default rule; files from before it searched every block
        settings["highest_layer"] = "first_outlier_block"
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return _cache_dir(cache_dir) / f"{_slug(ident)}-{key}.json"


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def _slug(ident: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", ident)


def cached_calibrations(tower_or_identity: nn.Module | str,
                        cache_dir: str | os.PathLike | None = None) -> list[tuple[Path, RegisterNeurons]]:
    """Every calibration of this tower in the cache, whatever its settings, newest first.

    Only files named ``<identity>-<settings hash>.json`` (:func:`cache_path`) whose content names the
    same tower are listed: a file of another tower (other weights, or renamed) is never returned;
    unreadable files are skipped. [decision] newest = latest file modification time (ties: file
    name): calibrating again is how a user says which neurons they want, and the JSON has no clock.
    """
    ident = tower_or_identity if isinstance(tower_or_identity, str) else tower_identity(tower_or_identity)
    name = re.compile(re.escape(_slug(ident)) + r"-[0-9a-f]{8}\.json")
    found = []
    for path in _cache_dir(cache_dir).glob("*.json"):
        if not name.fullmatch(path.name):
            continue
        try:
            rn = RegisterNeurons.from_json(path)
        except InputError:
            continue
        if rn.tower == ident:
            found.append((path.stat().st_mtime_ns, path.name, path, rn))
    found.sort(key=lambda x: (x[0], x[1]), reverse=True)
    return [(path, rn) for _, _, path, rn in found]


def latest_calibration(tower_or_identity: nn.Module | str,
                       cache_dir: str | os.PathLike | None = None) -> RegisterNeurons | None:
    """The newest cached calibration of this tower (any settings; see :func:`cached_calibrations`), or
    None. This is what OccamToken uses when no neurons are given: ``vtprune calibrate registers`` with
    any options, then ``vtprune.apply(model, "occamtoken")``, runs with exactly those neurons."""
    found = cached_calibrations(tower_or_identity, cache_dir)
    return found[0][1] if found else None


def load_or_calibrate(tower: nn.Module, images_fn: Callable[[], Iterable[Any]] | Iterable[Any] | None = None,
                      cache_dir: str | os.PathLike | None = None, *, neurons: Any = None, refresh: bool = False,
                      progress: bool = True, **calibrate_kwargs: Any) -> RegisterNeurons:
    """The register neurons of ``tower``: the user's own, else the cached ones, else calibrated now.

    neurons: the user's override (a :class:`RegisterNeurons`, a JSON path, (layer, neuron) pairs, or a
        ``{layer: [neurons]}`` dict) — returned as is (a warning if it names another tower).
    images_fn: a callable returning the calibration images (called only when calibration is needed),
        or the iterable itself. See :func:`calibrate_register_neurons` for the batch format.
    cache_dir: a directory (default :func:`default_cache_dir`); the file name is keyed by
        :func:`tower_identity` and the calibration settings, so changed weights or settings never pick
        up a stale result. ``refresh=True`` recalibrates and overwrites.
    """
    if neurons is not None:
        rn = _as_neurons(neurons)
        if rn.tower:
            ident = tower_identity(tower)
            if rn.tower != ident:
                warnings.warn(f"The register neurons given were calibrated on {rn.tower!r}, this tower is "
                              f"{ident!r}; using them anyway.", stacklevel=2)
        return rn
    ident = tower_identity(tower)
    path = cache_path(ident, cache_dir, **calibrate_kwargs)
    if path.is_file() and not refresh:
        rn = RegisterNeurons.from_json(path)
        if rn.tower == ident:
            return rn
    if images_fn is None:
        raise InputError(
            f"No register neurons cached for this tower ({ident}) at {path}. Calibrate them with the "
            "register calibration of the vtprune CLI (--model PATH --images DIR), pass images_fn=..., or "
            "pass your own neurons=...")
    images = images_fn() if callable(images_fn) else images_fn
    rn = calibrate_register_neurons(tower, images, progress=progress, **calibrate_kwargs)
    rn.to_json(path)
    return rn


# ================================================================================================
# The intervention
# ================================================================================================
def redirect_activations(h: torch.Tensor, channels: torch.Tensor, patch: slice = slice(1, -1),
                         register: slice = slice(-1, None), mode: str = "per_channel") -> torch.Tensor:
    """Move register-neuron activations from the patches onto the register (returns a new tensor).

    h: (B, S, I) MLP activations; positions ``patch`` are the patch tokens, ``register`` the register
    copies; anything else (CLS) is untouched. For each batch element separately:

    * ``per_channel`` (OccamToken Eq. 9 / Algorithm 1): for each listed channel k,
      ``h[r, k] = max over patch tokens of h[i, k]``, then ``h[i, k] = 0`` on the patch tokens;
    * ``signed_max`` (the reference code's ``activate_on_registers`` with ``sign_max``): one scalar for
      all listed channels of the layer — the entry of largest magnitude, with its sign, of
      ``h[:, channels]`` over **all** positions (CLS, patches and the register's own activation) and all
      those channels (``max`` if ``|max| > |min|`` else ``min``) — written to every listed channel of the
      register; the patches' listed channels are zeroed. (The reference applies it to batch element 0
      only; here each batch element / crop gets its own.)
    """
    if mode not in MODES:
        raise InputError(f"Unknown register mode {mode!r}; choose one of {', '.join(MODES)}.")
    if channels.numel() == 0:
        return h
    out = h.clone()
    sub = out[:, :, channels]  # (B, S, C) copy
    patches = sub[:, patch]
    if patches.shape[1] == 0:
        raise InputError("The tower produced no patch tokens to take the maximum over.")
    if mode == "per_channel":
        reg = patches.amax(dim=1)  # (B, C)
    else:
        flat = sub.flatten(1)
        hi, lo = flat.amax(1), flat.amin(1)
        val = torch.where(hi.abs() > lo.abs(), hi, lo)
        reg = val[:, None].expand(-1, sub.shape[2])
    sub[:, patch] = 0
    sub[:, register] = reg[:, None, :].to(sub.dtype)
    out[:, :, channels] = sub
    return out


def _check_neurons(t: _Tower, rn: RegisterNeurons) -> dict[int, list[int]]:
    by_layer = rn.by_layer()
    L, width = t.num_layers, t.intermediate_size
    for layer, ns in by_layer.items():
        if not 0 <= layer < L:
            raise InputError(f"Register neuron layer {layer} is outside the tower's {L} blocks; these neurons "
                             f"belong to another tower ({rn.tower or 'unknown'}).")
        bad = [n for n in ns if not 0 <= n < width]
        if bad:
            raise InputError(f"Register neurons {bad} of layer {layer} are outside the MLP width {width}.")
    return by_layer


@contextlib.contextmanager
def test_time_register(tower: nn.Module, neurons: Any = None, mode: str = "per_channel") -> Iterator[int]:
    """While active, the tower runs with one test-time register (Jiang et al.; OccamToken Sec. 3.1).

    * CLIP: one zero token (no position embedding) is appended after the patches, before the pre-norm,
      so the tower's outputs and every ``hidden_states[i]`` hold ``1 + N + 1`` tokens: CLS, patches,
      register;
    * Qwen2.5-VL / Qwen3-VL: 4 zero tokens (one 2×2 merge group) after each image's N patches in the
      packed sequence (no position embedding, rotary position (0, 0), each image's attention segment
      grown by 4; see :class:`vtprune.models.qwen2_5_vl.QwenTower`): hidden states hold ``Σ (N_i + 4)`` rows, the merger's output
      (and every DeepStack feature) ``Σ (N_i / 4 + 1)`` rows — the register's merged token last per image;
    * in each listed block's MLP activation the listed channels are redirected onto the register
      (:func:`redirect_activations`, ``mode="per_channel"`` (the paper) or ``"signed_max"`` (the
      reference code)), per image — each LLaVA-NeXT crop is a batch element, so per crop; on Qwen the
      4 copies all receive the same values.

    neurons: a :class:`RegisterNeurons`, (layer, neuron) pairs, a ``{layer: [neurons]}`` dict, a JSON
    path, or None / empty (the register is still appended; nothing is redirected).
    Yields the number of register tokens appended per image (CLIP 1, Qwen 4). Hooks are removed on exit,
    also on error.
    """
    if mode not in MODES:
        raise InputError(f"Unknown register mode {mode!r}; choose one of {', '.join(MODES)}.")
    t = _resolve_tower(tower)
    by_layer = _check_neurons(t, _as_neurons(neurons))
    if getattr(t.core, "_vtprune_register_active", False):
        raise InputError("A test-time register is already active on this tower; nested registers are not supported.")
    handles = []
    try:
        handles.append(t.append_register_hook())
        for layer, ns in by_layer.items():
            handles.append(t.site(layer).register_forward_pre_hook(_redirect_hook(t, ns, mode)))
        t.core._vtprune_register_active = True
        yield t.register_copies
    finally:
        for h in handles:
            h.remove()
        t.core._vtprune_register_active = False


def _redirect_hook(t: _Tower, neurons: list[int], mode: str):
    cache: dict[torch.device, torch.Tensor] = {}

    def hook(module, args):
        h = args[0]
        ch = cache.get(h.device)
        if ch is None:
            ch = cache[h.device] = torch.tensor(neurons, dtype=torch.long, device=h.device)
        return (t.redirect(h, ch, mode), *args[1:])

    return hook


# ================================================================================================
# Diagnostics
# ================================================================================================
class _Stop(Exception):
    pass


@torch.no_grad()
def cls_attention_probs(tower: nn.Module, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
    """(B, H, S) fp32 attention probabilities of the CLS query at block ``layer`` (over every key: CLS,
    patches and — inside :func:`test_time_register` — the register), without switching the tower to
    eager attention: the block's input is captured and ``softmax(q_cls · kᵀ · head_dim^-0.5)`` is
    computed from its own ``layer_norm1``, ``q_proj`` and ``k_proj`` (the tower stops after that block's
    input is known). ``layer=-2`` is the block producing LLaVA's ``vision_feature_layer=-2`` features."""
    t = _resolve_tower(tower)
    L = t.num_layers
    if not -L <= layer < L:
        raise InputError(f"layer={layer} is outside the tower's {L} blocks.")
    idx = layer % L
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args):
        captured["x"] = args[0]
        raise _Stop

    handle = t.layers[idx].register_forward_pre_hook(grab)
    try:
        t.run(t.prepare(pixel_values))
    except _Stop:
        pass
    finally:
        handle.remove()
    return t.cls_attention(idx, captured["x"])


def effective_attended_tokens(cls_attention_probs: torch.Tensor, per_head: bool = False) -> torch.Tensor:
    """``n_eff = exp(H(p))``, the support size of a uniform distribution with the entropy of ``p``
    (OccamToken Sec. 3.2, Observation 1).

    cls_attention_probs: ``(K,)`` (already head-averaged), ``(H, K)`` or ``(B, H, K)`` attention
    probabilities over the K tokens of interest; each row is renormalised over those K first (so a
    caller may pass a column subset, e.g. the patches only).
    per_head=False (default, as the paper's stage-I scores): entropy of the **head-mean** distribution;
    per_head=True: ``exp(H)`` of each head, then averaged over heads.
    Returns a 0-d tensor for (K,) / (H, K) input, (B,) for (B, H, K).
    """
    p = cls_attention_probs.float()
    if p.dim() == 1:
        p = p[None, None]
        squeeze = 2
    elif p.dim() == 2:
        p = p[None]
        squeeze = 1
    elif p.dim() == 3:
        squeeze = 0
    else:
        raise InputError(f"Expected (K,), (H, K) or (B, H, K) probabilities, got shape {tuple(p.shape)}.")
    if not per_head:
        p = p.mean(1, keepdim=True)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (B, H')
    n = torch.exp(ent).mean(1)  # (B,)
    return n[0] if squeeze else n


@torch.no_grad()
def register_diagnostic(tower: nn.Module, pixel_values: torch.Tensor, neurons: Any = None, layer: int = -2,
                        mode: str = "per_channel", per_head: bool = False,
                        patches_only: bool = True) -> dict[str, Any]:
    """``n_eff`` of the CLS attention at block ``layer`` without and with the test-time register
    (the paper: 42 → 281 on LLaVA-1.5's CLIP at the feature layer).

    patches_only=True (default): the distribution over the patch tokens only (CLS and register columns
    dropped, renormalised) — "the CLS→vision attention distribution"; False: the full row.
    Returns ``{"n_eff_without", "n_eff_with"}`` (means over the batch), the per-image lists, the mean
    head-averaged CLS→register attention (``register_attention``), and the layer and patch count.
    """
    without = cls_attention_probs(tower, pixel_values, layer)
    with test_time_register(tower, neurons, mode=mode):
        with_reg = cls_attention_probs(tower, pixel_values, layer)
    n = without.shape[-1] - 1
    a = without[..., 1:] if patches_only else without
    b = with_reg[..., 1:-1] if patches_only else with_reg
    ne_without = effective_attended_tokens(a, per_head=per_head)
    ne_with = effective_attended_tokens(b, per_head=per_head)
    return {
        "n_eff_without": float(ne_without.mean()),
        "n_eff_with": float(ne_with.mean()),
        "per_image_without": [float(v) for v in ne_without],
        "per_image_with": [float(v) for v in ne_with],
        "register_attention": float(with_reg[..., -1].mean()),
        "num_patches": n,
        "layer": layer,
    }


# ================================================================================================
# Loading a tower from a local directory, and the CLI
# ================================================================================================
_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise InputError(f"Unknown dtype {name!r}; use float32, float16 or bfloat16.") from None


def _vision_class(vision_config):
    import importlib

    from .models.families import all_families

    mt = getattr(vision_config, "model_type", "")
    for fam in all_families():
        if mt in fam.vision_classes:
            module, name = fam.vision_classes[mt]
            return getattr(importlib.import_module(module), name)
    known = sorted({k for f in all_families() for k in f.vision_classes})
    raise UnsupportedModelError(f"Vision towers of type {mt!r} are not supported ({', '.join(known)}).")


_TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.visual.", "visual.")


def _load_tower_weights(path: Path, tower: nn.Module) -> bool:
    """Load only the vision-tower tensors of a VLM checkpoint into ``tower``; False if the names do not
    line up (the caller then loads the whole model)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return False
    expected = set(tower.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                for pre in _TOWER_PREFIXES:
                    if key.startswith(pre):
                        name = key[len(pre):]
                        if name not in expected and name.startswith("vision_model."):
                            name = name[len("vision_model."):]
                        if name in expected:
                            state[name] = sf.get_tensor(key)
                        break
    missing = expected - set(state)
    # buffers such as position_ids are not stored in checkpoints
    missing = {m for m in missing if not m.endswith("position_ids")}
    if missing or not state:
        return False
    tower.load_state_dict(state, strict=False)
    return True


def load_vision_tower(path: str | os.PathLike, device: str = "cpu",
                      dtype: str | torch.dtype | None = None) -> nn.Module:
    """The vision tower of a local HF directory: a VLM (LLaVA, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL — only the
    tower's tensors are read when the names line up) or a CLIP / CLIP-vision checkpoint. Eval mode."""
    from transformers import AutoConfig

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--model {str(path)!r} is not a directory holding a Hugging Face model.")
    dt = dtype if isinstance(dtype, torch.dtype) else _dtype(dtype, device)
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    vc = getattr(cfg, "vision_config", None)
    if cfg.model_type in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel.from_pretrained(str(path), dtype=dt, local_files_only=True)
    elif vc is not None:
        cls = _vision_class(vc)
        tower = cls._from_config(vc, dtype=dt) if hasattr(cls, "_from_config") else cls(vc)
        if not _load_tower_weights(path, tower):
            from transformers import AutoModelForImageTextToText

            full = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dt, local_files_only=True)
            tower = _resolve_tower(full).core
    else:
        raise UnsupportedModelError(f"{str(path)!r} ({cfg.model_type}) is neither a VLM nor a CLIP vision model.")
    return tower.to(device=device, dtype=dt).eval()


def _image_files(folder: Path, count: int, seed: int) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"--images {str(folder)!r} is not a directory.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXT and p.is_file())
    if not files:
        raise InputError(f"No images ({', '.join(sorted(_IMAGE_EXT))}) found under {str(folder)!r}.")
    if count and count < len(files):
        files = sorted(random.Random(seed).sample(files, count))
    return files


def _processor_batches(model_path: Path, files: list[Path], batch_size: int, tower: _Tower) -> Iterator[Any]:
    from PIL import Image
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(str(model_path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - say what to do
        raise InputError(f"No image processor could be loaded from {str(model_path)!r} ({e}); the model "
                         "directory needs its preprocessor_config.json.") from None
    for i in range(0, len(files), batch_size):
        imgs = []
        for f in files[i:i + batch_size]:
            with Image.open(f) as im:
                imgs.append(im.convert("RGB"))
        out = proc(images=imgs, return_tensors="pt")
        yield tower.processor_batch(out)


def add_calibrate_registers_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Declare the options of ``calibrate registers`` on ``parser``."""
    parser.add_argument("--model", required=True, help="local HF model directory (a VLM, or a CLIP vision tower)")
    parser.add_argument("--images", required=True, help="folder of calibration images (searched recursively)")
    parser.add_argument("--num-images", type=int, default=256, help="images to sample (default 256; 0 = all)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="outlier output-norm threshold (default: automatic, see auto_outlier_threshold)")
    parser.add_argument("--top-k", type=int, default=10, help="register neurons to keep (default 10)")
    parser.add_argument("--highest-layer", type=int, default=None,
                        help="only neurons of blocks <= this (0-based; default: the block at which the outliers "
                             "appear, i.e. the first block whose largest patch norm, averaged over the images "
                             "with outliers, exceeds the threshold: the reference's rule, which gave 5 on "
                             "CLIP ViT-B/16)")
    parser.add_argument("--detection-layer", type=int, default=-1, help="block whose output marks outliers (-1)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="sparse-neuron share (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: fp16 on GPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image sample")
    parser.add_argument("--out", default=None, help="also write the neurons to this JSON file")
    parser.add_argument("--cache-dir", default=None,
                        help="cache directory (default $VTPRUNE_CACHE/registers or ~/.cache/vtprune/registers, "
                             "the one apply(model, \"occamtoken\") reads)")
    parser.add_argument("--no-cache", action="store_true", help="do not write the user cache")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _cache_note(path: Path) -> str:
    """What the CLI says after a cache path that OccamToken will not read by default."""
    if path.parent.resolve() == default_cache_dir().resolve():
        return ""
    return (f" (apply(model, \"occamtoken\") reads the default cache {default_cache_dir()}, not this one: "
            "pass neurons=<this file>)")


def calibrate_registers_cli(args: argparse.Namespace) -> int:
    """Run ``calibrate registers``: calibrate, print a summary, write ``--out`` and the cache."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_path = Path(args.model)
    tower = load_vision_tower(model_path, device=device, dtype=args.dtype)
    t = _resolve_tower(tower)
    files = _image_files(Path(args.images), args.num_images, args.seed)
    rn = calibrate_register_neurons(
        tower, _processor_batches(model_path, files, max(1, args.batch_size), t), top_k=args.top_k,
        highest_layer=args.highest_layer, outlier_threshold=args.threshold, detection_layer=args.detection_layer,
        sparsity=args.sparsity, progress=not args.quiet, total_images=len(files))
    written = []
    if args.out:
        rn.to_json(args.out)
        written.append(str(args.out))
    if not args.no_cache:
        path = cache_path(rn.tower, args.cache_dir, top_k=args.top_k, highest_layer=args.highest_layer,
                          outlier_threshold=args.threshold, detection_layer=args.detection_layer,
                          sparsity=args.sparsity)
        rn.to_json(path)
        written.append(str(path) + _cache_note(path))
    thr = "none" if rn.threshold is None else f"{rn.threshold:.4g}"
    print(f"tower: {rn.tower}")
    print(f"outlier threshold: {thr} at block {rn.detection_layer}; images with outliers: "
          f"{rn.stats.get('images_with_outliers', 0)}/{rn.stats.get('num_images', 0)}")
    if "norm_quantiles" in rn.settings:
        q = ", ".join(f"q{float(k):g}={v:.4g}" for k, v in rn.settings["norm_quantiles"].items())
        print(f"patch output norms: {q}")
    if rn.settings.get("highest_layer") is not None:
        how = "given" if rn.settings.get("highest_layer_rule") == "given" else "where the outliers appear"
        print(f"neurons searched in blocks 0..{rn.settings['highest_layer']} ({how})")
    if rn.found:
        print("register neurons (layer, neuron, score): " +
              ", ".join(f"({layer}, {n}, {s:.3g})" for (layer, n), s in zip(rn.neurons, rn.scores)))
    else:
        print(f"no register neurons: {rn.message}")
    for w in written:
        print(f"written: {w}")
    return 0
