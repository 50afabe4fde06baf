"""OccamToken — "OccamToken: Efficient VLM Inference with Training-Free and Budget-Adaptive Token
Pruning" (arXiv 2605.29657). No official code exists; this follows the paper's equations and
Algorithm 1 as condensed in the project's spec.

A token is kept when its attention beats a *test-time register* (Jiang et al., arXiv 2506.08010)
scored in the same softmax, so the budget follows the image (stage I) and the question (stage II):

* register: one zero token appended to each crop's patch sequence in the vision tower; calibrated
  outlier neurons move their activation onto it (``vtprune.occamtoken``). It reaches the LLM like a
  patch and is never pruned.
* stage I (vision output): keep v iff s1(v) ≥ λ1·s1(r); CLS towers: s1 = CLS→token attention at the
  feature layer; Qwen towers: "mutual" score, the mean attention a token receives from all tokens
  (register included), pooled to merged 2×2 tokens.
* stage II (decoder layer l): s2(v) = max over the text tokens after the image of the head-mean
  attention to v; s2(r) = mean over them of the attention to the register(s); keep v iff
  s2(v) ≥ λ2·s2(r); tokens are dropped from layer l+1 on and the KV cache of layers 0..l is compacted.

Defaults: λ1 = 0.015 (LLaVA-1.5), 0.045 (LLaVA-NeXT) [paper]; λ2 = 1.0 [paper's range 0.6-1.3];
l = 11 (LLaVA) / 10 (Qwen) [paper]. Calibrate λ2 to a target mean budget with
``vtprune.occamtoken.budget.calibrate_pairs`` / ``vtprune calibrate budget --pairs``.

Fixed budget (not in the paper; what a host that fixes token counts in advance, such as vLLM, needs):
``keep=N`` or ``ratio=r`` replaces stage I's threshold by a ranking — the N candidates with the largest
s1(v) / s1(r), each against its own crop's register, are kept; λ1 is then unused.

[decision]s, all configurable:
- stage I reads the feature layer (LLaVA's ``vision_feature_layer``, −2) after the register was added
  (the paper says "the vision encoder after register construction", not which layer);
- stage II layer (``layer=``, 0-based index of the decoder layer whose attention is read): the paper
  writes "layer 11" (Fig. 5, App. A) and once "the 11th decoder layer" (App. A) for LLaVA, "layer 10"
  for Qwen, without saying how layers are counted. We read "layer 11" as the index (the figure's
  "Pruning Layer" axis names layers, not ordinals): ``layer=11``; ``layer=10`` is the 1-based reading;
- when no patch beats the register, stage I keeps the register alone, as the paper's
  ``S1 = {v : s1(v) ≥ λ1·s1(r)} ∪ {r}`` allows; ``min_kept=N`` keeps at least the N best ratios
  (our option; the earlier versions kept the single best patch);
- Qwen: λ1 default 0.5 is ours and unvalidated (the paper publishes no Qwen λ1; it reports Qwen3-VL
  only at relative budgets 22.2 % / 11.1 %): calibrate it with ``vtprune calibrate budget --stage 1``.
  Scores are pooled 2×2 by the mean. The register is four zero patch rows (one merge group) and is
  scored as their mean; the mutual score averages the attention a token receives over all query rows,
  the register's four among them — the same weight as one merged token's four patches, i.e. the
  paper's Eq. 6 with the register counted once among the |V| + 1 tokens. On Qwen2.5-VL's windowed
  blocks the register is its own window (see ``vtprune.occamtoken``);
- LLaVA-NeXT: by default the paper's accounting, base image + crops without unpadding or newline
  tokens (5 × 576 = 2,880 tokens at 672×672; ``apply(..., layout="flat")`` is implied), so budgets
  read as in the paper (320 / 160 / 40); ``layout="model"`` keeps the model's own unpadded layout with
  its newline tokens (always kept, counted in ``tokens_entering_llm``). Stage I per crop against the
  crop's own register; one register per crop reaches the LLM (counted in the budget, as the paper's
  Eq. 18 counts r), stage II uses their mean as s2(r);
- stage II: head-mean of full softmax rows (BOS sink included), text rows = all tokens after the last
  image; tokens dropped from the input of layer l+1;
- the KV cache of layers 0..l is compacted to the kept tokens (the paper's KV figures imply it);
- the register takes the position of its image's last patch.
Where the register neurons come from (looked up once, by ``load_resources`` when ``apply`` binds the
method): ``neurons=`` (a RegisterNeurons, JSON path or pairs), else a ``vtprune_registers.json`` next
to the model's weights, else the newest calibration of this very tower (same ``tower_identity``) in the user cache written by ``vtprune calibrate registers`` — whatever
options it was run with ([decision]: the newest, because calibrating again is how a user says which
neurons they want; a file of another tower is never used); with none, the register is appended without redirected neurons (a
warning says so) — the method keeps working, with a weaker reference.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import torch

from ..errors import ArgumentError, UnboundMethodError, UnsupportedMethodError
from ..occamtoken.scores import relative_keep, stage1_columns, stage2_keep, stage2_scores
from ..models.families import FamilyDefaults
from .base import Method, Selection, Stage, register_method, sorted_topk

def _check_neurons_argument(neurons) -> None:
    from ..occamtoken.neurons import as_neurons

    allowed = "pass the JSON written by `vtprune calibrate registers`, a list of (layer, neuron) pairs, or None"
    if isinstance(neurons, (str, os.PathLike)):
        if not Path(neurons).is_file():
            raise ArgumentError(f"occamtoken: neurons={str(neurons)!r} is not a file; {allowed}.")
        return
    try:
        as_neurons(neurons)
    except (TypeError, ValueError, IndexError, KeyError) as err:
        raise ArgumentError(f"occamtoken: neurons={neurons!r} is not allowed ({err}); {allowed}.") from None


DEFAULT_LAMBDA1 = FamilyDefaults("occamtoken", "lambda1")  # family -> λ1, declared by each model family
DEFAULT_LAYER = FamilyDefaults("occamtoken", "layer")  # family -> stage-II layer
REGISTER_FILE = "vtprune_registers.json"


@register_method
class OccamToken(Method):
    name = "occamtoken"
    default_layout = "flat"  # LLaVA-NeXT: the paper's 2,880-token base + crops accounting
    stages = (Stage.VISION, Stage.LLM)
    extra_tokens = 1

    def __init__(self, lambda1: float | None = None, lambda2: float = 1.0, layer: int | None = None,
                 stage1: bool = True, stage2: bool = True, neurons=None,
                 register_mode: Literal["per_channel", "signed_max"] = "per_channel",
                 keep: int | None = None, ratio: float | None = None, min_kept: int = 0):
        super().__init__(keep=keep, ratio=ratio)
        if min_kept < 0:
            raise ArgumentError(f"occamtoken: min_kept={min_kept} is not allowed; it is a count of tokens ≥ 0.")
        self.min_kept = min_kept
        if (keep is not None or ratio is not None) and not stage1:
            raise UnsupportedMethodError("OccamToken's keep=/ratio= budget applies to stage I; enable stage1.")
        if not (stage1 or stage2):
            raise UnsupportedMethodError("OccamToken needs stage1, stage2 or both enabled.")
        for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
            if value is not None and value < 0:
                raise ArgumentError(f"occamtoken: {name}={value!r} is not allowed; {name} must be ≥ 0.")
        if layer is not None and layer < 0:
            raise ArgumentError(f"occamtoken: layer={layer!r} is not allowed; stage II reads a 0-based decoder layer ≥ 0.")
        if neurons is not None and not isinstance(neurons, (str, os.PathLike, dict)) and not hasattr(neurons, "neurons"):
            neurons = list(neurons) if hasattr(neurons, "__iter__") else neurons  # an iterator is read once
        _check_neurons_argument(neurons)
        self.lambda1, self.lambda2, self.layer = lambda1, float(lambda2), layer
        self._requested = (lambda1, layer)  # None = the family's default, resolved by each bind()
        self.stage1, self.stage2 = stage1, stage2
        self.neurons, self.register_mode = neurons, register_mode
        self.loaded_neurons = None  # the RegisterNeurons in use, set by load_resources on the bound method
        self.stages = tuple(s for s, on in ((Stage.VISION, stage1), (Stage.LLM, stage2)) if on)

    def resolve(self, family: str, num_layers: int) -> None:
        super().resolve(family, num_layers)
        self.family = family
        lambda1, layer = self._requested
        self.lambda1 = DEFAULT_LAMBDA1[family] if lambda1 is None else lambda1
        self.layer = min(DEFAULT_LAYER[family], num_layers - 2) if layer is None else layer
        if self.stage2 and not 0 <= self.layer < num_layers - 1:
            raise UnsupportedMethodError(
                f"OccamToken stage II reads decoder layer {self.layer}, but the model has {num_layers} layers; "
                f"pass layer= in 0..{num_layers - 2}.")
        self.llm_layers = (self.layer + 1,) if self.stage2 else ()

    @property
    def ranked(self) -> bool:
        """Stage I keeps a fixed budget, the best ratios s1(v) / s1(r), instead of thresholding at λ1."""
        return self.keep is not None or self.ratio is not None

    def describe(self) -> str:
        default = "the family's"  # a configured method, not bound yet
        lambda1 = default if self.lambda1 is None else self.lambda1
        stage1 = f"stage I top {self.keep or self.ratio} by s1(v)/s1(r)" if self.ranked else f"λ1={lambda1}"
        layer = default if self.layer is None else self.layer
        parts = [stage1 if self.stage1 else "no stage I",
                 f"λ2={self.lambda2}, l={layer}" if self.stage2 else "no stage II"]
        return f"occamtoken({', '.join(parts)})"

    # -- the register ----------------------------------------------------------------------------
    def load_resources(self, adapter) -> None:
        """Find the register neurons of this model's tower (see the module docstring for where they come
        from), once per bound method."""
        self.loaded_neurons = self._find_neurons(adapter.vision_module, adapter.model)

    def vision_tower_patch(self, adapter):
        from ..occamtoken.intervention import test_time_register

        if self.loaded_neurons is None:
            raise UnboundMethodError("occamtoken: the register neurons are not loaded; bind the method to the model "
                                     "and call load_resources(adapter) first (vtprune.apply does both).")
        return test_time_register(adapter.vision_module, self.loaded_neurons, mode=self.register_mode)

    def _find_neurons(self, tower, model):
        from ..occamtoken.neuron_cache import latest_calibration, load_or_calibrate
        from ..occamtoken.neurons import RegisterNeurons

        if self.neurons is not None:
            return load_or_calibrate(tower, neurons=self.neurons)
        source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        shipped = Path(source) / REGISTER_FILE if source else None
        if shipped is not None and shipped.is_file():
            return load_or_calibrate(tower, neurons=shipped)
        cached = latest_calibration(tower)
        if cached is not None:
            return cached
        warnings.warn("OccamToken: no register neurons are calibrated for this vision tower; the register is "
                      "appended without redirected neurons. Run `vtprune calibrate registers --model PATH --images DIR` "
                      "for the full method.", stacklevel=4)  # the caller of apply()
        return RegisterNeurons([], None, -1, "", [], "not calibrated", {}, {})

    # -- stage I -----------------------------------------------------------------------------------
    def select_vision(self, ctx):
        n = ctx.num_tokens
        if "cls_attention" not in ctx.capabilities:
            scores, reference = ctx.received_attention, ctx.register_received_attention.mean()
            per_token = reference.expand(n)
            references = reference.reshape(1)
        else:  # every crop against its own register, all crops at once (one kept-count read-back, not one per crop)
            cls = ctx.cls_attention  # (H, candidates + one register column per crop)
            columns = stage1_columns(cls)  # head mean of every column
            slices = ctx.crop_slices
            scores = torch.cat([columns[sl] for sl in slices])
            references = columns[n:n + len(slices)]
            per_token = torch.cat([references[c].expand(sl.stop - sl.start) for c, sl in enumerate(slices)])
        ratios = scores / per_token.clamp_min(1e-12)
        if self.ranked:  # a fixed budget: the register is the ranking key (comparable across crops)
            keep = sorted_topk(ratios, self.budget(n))
            thresholds = references[:0]
        else:
            keep = relative_keep(scores, per_token, self.lambda1)  # (the stage's one read-back: its kept count)
            thresholds = self.lambda1 * references
            if keep.numel() < self.min_kept:  # our floor, not the paper's (its S1 may be the register alone)
                keep = sorted_topk(ratios, self.min_kept)
        # ratios and thresholds stay tensors on the device; readers convert them (.tolist())
        return Selection(keep=keep, info={"stage1_kept": keep.numel(), "stage1_thresholds": thresholds,
                                          "stage1_ratios": ratios})

    # -- stage II ----------------------------------------------------------------------------------
    def select_llm(self, ctx):
        if ctx.registers.numel() == 0:
            raise UnsupportedMethodError("OccamToken stage II needs the register tokens in the LLM input.")
        rows = ctx.text_after
        scores, reference = stage2_scores(ctx.attention(rows), ctx.visual, ctx.registers)
        keep = stage2_keep(scores, reference, self.lambda2)  # (the stage's one read-back: its kept count)
        ratios = scores / reference.clamp_min(1e-12)
        return Selection(keep=keep, info={"stage2_kept": keep.numel(), "stage2_threshold": self.lambda2 * reference,
                                          "stage2_ratios": ratios})
