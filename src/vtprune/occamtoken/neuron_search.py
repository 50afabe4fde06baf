"""Finding the register neurons of a vision tower from ~100-500 images.

After Jiang et al., "Vision Transformers Don't Need Trained Registers" (NeurIPS 2025, arXiv
2506.08010), Sec. 3, as used by OccamToken (arXiv 2605.29657, App. A "Register construction"):
high-norm outlier tokens of a ViT (attention sinks) are produced by a few sparse MLP neurons;
:func:`calibrate_register_neurons` finds them.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import InputError
from .neurons import RegisterNeurons
from .towers import RegisterTower, resolve_tower, tower_identity

__all__ = ["auto_outlier_threshold", "first_outlier_block", "calibrate_register_neurons"]


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


def _iter_images(tower: RegisterTower, images: Iterable[Any], micro_batch: int) -> Iterator[dict[str, Any]]:
    for batch in images:
        b = tower.prepare(batch)
        if tower.batched and micro_batch and b["pixel_values"].shape[0] > micro_batch:
            for chunk in b["pixel_values"].split(micro_batch):
                yield {"pixel_values": chunk}
        else:
            yield b


@contextlib.contextmanager
def _recording(tower: RegisterTower, act_layers: Iterable[int], out_layers: Iterable[int]):
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


def _outlier_masks(tower: RegisterTower, out: torch.Tensor, batch, threshold: float) -> list[torch.Tensor]:
    masks = []
    for o in tower.split(out, batch):
        mask = o.float().norm(dim=-1) > threshold
        if tower.has_cls:
            mask[0] = False  # never mark CLS
        masks.append(mask)
    return masks


def _patch_norms(tower: RegisterTower, out: torch.Tensor, batch) -> list[torch.Tensor]:
    start = 1 if tower.has_cls else 0
    return [o.float().norm(dim=-1)[start:].cpu() for o in tower.split(out, batch)]


def _peak_patch_norms(tower: RegisterTower, outs: dict[int, torch.Tensor], batch, blocks: Sequence[int]) -> torch.Tensor:
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
    t = resolve_tower(tower)
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
