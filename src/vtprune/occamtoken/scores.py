"""Pure scoring and threshold functions of OccamToken (tensors in, tensors out).

OccamToken: "Efficient VLM Inference with Training-Free and Budget-Adaptive Token Pruning"
(Li et al., arXiv 2605.29657). A visual token is kept when its attention score beats
``λ ·`` the score of a *test-time register* scored inside the same softmax (Eq. 3 of the paper):

* stage I  (vision encoder output, image-adaptive):  keep v iff ``s1(v) >= λ1 · s1(r)`` (Eq. 5 / 12);
* stage II (inside the LLM, query-adaptive):          keep v iff ``s2(v) >= λ2 · s2(r)`` (Eq. 8 / 17);
* budget matching: choose λ by bisection so the mean kept count hits a target (Eq. 19).

Nothing here knows about models: the method class (``vtprune.methods.occamtoken``) extracts the
attention rows and calls these functions. Tags: **[paper]** = stated in the paper; **[decision]** = a project choice
where the paper is silent (listed in ``vtprune.methods.occamtoken``); every decision is an argument.

Conventions: attention tensors are probabilities of the *full* softmax rows (nothing renormalised),
``(H, ...)`` with heads first, or already head-averaged without the head axis (pass ``heads=False``
where the shape is ambiguous). All scores are computed in fp32.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from ..methods.base import to_device

__all__ = [
    "stage1_cls_scores",
    "stage1_columns",
    "stage1_keep",
    "stage2_scores",
    "stage2_keep",
    "relative_keep",
    "calibrate_lambda",
    "LambdaFit",
]


def _head_mean(attn: torch.Tensor, ndim_without_heads: int, heads: bool | None) -> torch.Tensor:
    """Average over the leading head axis when there is one. [decision] head-mean of the
    probabilities (the paper: "averaged over attention heads when multi-head attention is used")."""
    attn = attn.float()
    if heads is None:
        heads = attn.dim() == ndim_without_heads + 1
    if heads:
        if attn.dim() != ndim_without_heads + 1:
            raise ValueError(f"expected a head axis followed by {ndim_without_heads} dim(s), "
                             f"got shape {tuple(attn.shape)}")
        return attn.mean(0)
    if attn.dim() != ndim_without_heads:
        raise ValueError(f"expected a {ndim_without_heads}-d head-averaged tensor, got shape {tuple(attn.shape)}")
    return attn


# -- stage I ------------------------------------------------------------------------------------
def stage1_cls_scores(cls_attn: torch.Tensor, num_registers: int = 1,
                      heads: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-I scores of CLS towers **[paper, Eq. 4 / 10]**: ``s1(v) = A[cls→v]``, ``s1(r) = A[cls→r]``.

    cls_attn: ``(H, K)`` CLS-row attention probabilities (or ``(K,)`` already head-averaged) over
        the K candidate columns: the patch tokens followed by the register column(s) — the register
        is the **last** column (columns of the CLS token itself must be removed by the caller; do not
        renormalise: the register competes in the same softmax as the patches).
    num_registers: register columns at the end (1 per crop for CLIP). With several, ``s1(r)`` is
        their mean **[decision]**.

    Returns ``(scores of the K - num_registers patches, s1(r) as a 0-d tensor)``; head-mean **[decision:
    mean of the per-head probabilities]**.
    """
    a = _head_mean(cls_attn, 1, heads)
    if num_registers < 1 or a.shape[-1] <= num_registers:
        raise ValueError(f"need at least one patch column and num_registers >= 1 register column(s); "
                         f"got {a.shape[-1]} columns and num_registers={num_registers}")
    return a[:-num_registers], a[-num_registers:].mean()


def stage1_columns(cls_attn: torch.Tensor, heads: bool | None = None) -> torch.Tensor:
    """Head-mean CLS attention of every column of ``cls_attn`` ((H, K) or already (K,)): the patches'
    ``s1(v)`` and the registers' ``s1(r)`` of several crops at once (the same per-column mean as
    :func:`stage1_cls_scores`)."""
    return _head_mean(cls_attn, 1, heads)


def relative_threshold(reference: torch.Tensor | float, lam: float) -> torch.Tensor | float:
    """``lam · reference`` as the float32 threshold the scores are compared with: the product in double
    precision, then rounded to float32 (a tensor stays on its device: nothing is read back)."""
    if lam < 0 or not math.isfinite(float(lam)):
        raise ValueError(f"λ must be a finite number >= 0, got {lam}")
    if torch.is_tensor(reference):
        return (reference.double() * float(lam)).float()
    return float(lam) * float(reference)


def relative_mask(scores: torch.Tensor, reference: torch.Tensor | float, lam: float) -> torch.Tensor:
    """Bool mask of the tokens with ``score >= lam · reference``; ``reference`` may hold one value per
    token (e.g. each crop's register repeated over its tokens)."""
    return scores.float() >= relative_threshold(reference, lam)


def relative_keep(scores: torch.Tensor, reference: torch.Tensor | float, lam: float) -> torch.Tensor:
    """Sorted int64 indices of the tokens with ``score >= lam · reference`` (Eq. 3 of the paper)."""
    mask = relative_mask(scores, reference, lam)
    return torch.nonzero(mask).flatten()  # sync: the kept count is data-dependent (the rule of Eq. 3)


def stage1_keep(scores: torch.Tensor, register_score: torch.Tensor | float, lambda1: float) -> torch.Tensor:
    """Stage-I keep set **[paper, Eq. 5 / 12]**: patch indices with ``s1(v) >= λ1 · s1(r)``, ascending.

    The register is not a candidate here: it is **always kept** (``S1 = {...} ∪ {r}``); the caller
    appends it. Defaults of the paper: λ1 = 0.015 for LLaVA-1.5 (0.01–0.02 keeps ~200–300 of 576),
    0.045 for LLaVA-NeXT (keeps ~523 of 2880); none given for Qwen **[decision: expose it, or calibrate
    it to a target keep fraction with :func:`calibrate_lambda`]**.
    """
    return relative_keep(scores, register_score, lambda1)


# -- stage II -----------------------------------------------------------------------------------
def stage2_scores(attn_rows: torch.Tensor, visual_idx: torch.Tensor | Sequence[int],
                  register_idx: int | torch.Tensor | Sequence[int],
                  text_rows: torch.Tensor | Sequence[int] | None = None,
                  heads: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-II scores **[paper, Eq. 7 / 15-16]** at decoder layer l (11 for LLaVA, 10 for Qwen):
    ``s2(v) = max_j A[t_j→v]`` (max: a token may matter to a single word) and
    ``s2(r) = mean_j A[t_j→r]`` (mean: a stable reference).

    attn_rows: ``(H, R, L)`` (or ``(R, L)``) attention probabilities of R query rows over the L keys of
        the sequence — full softmax rows, BOS sink included, not renormalised **[decision]**;
        averaged over heads **[decision]**.
    visual_idx: key positions of the candidate visual tokens (registers excluded).
    register_idx: key position(s) of the register(s). Several registers (LLaVA-NeXT: one per crop)
        give ``s2(r)`` = mean over text rows, then mean over the registers **[decision]**.
    text_rows: which of the R rows are the text query tokens after the image (question, template,
        generation prompt) **[decision]**; default: all R rows.

    Returns ``(s2 of each visual candidate (V,), s2(r) as a 0-d tensor)``.
    """
    a = _head_mean(attn_rows, 2, heads)
    if text_rows is not None:
        a = a[torch.as_tensor(text_rows, dtype=torch.long, device=a.device)]
    if a.shape[0] == 0:
        raise ValueError("stage II needs at least one text query row")
    vis = _indices(visual_idx, a.device)
    reg = _indices(register_idx, a.device)
    if reg.numel() == 0:
        raise ValueError("stage II needs at least one register position")
    s_v = a[:, vis].amax(0) if vis.numel() else a.new_zeros(0)
    s_r = a[:, reg].mean(0).mean()
    return s_v, s_r


def _indices(idx, device) -> torch.Tensor:
    """int64 1-d indices on ``device``; a host tensor is queued there without waiting for the stream."""
    return to_device(torch.as_tensor(idx, dtype=torch.long).flatten(), device)


def stage2_keep(scores: torch.Tensor, register_score: torch.Tensor | float, lambda2: float) -> torch.Tensor:
    """Stage-II keep set **[paper, Eq. 8 / 17]**: candidate indices with ``s2(v) >= λ2 · s2(r)``,
    ascending; the register is always kept (the caller appends it). ``λ2 = 0`` keeps everything.
    The paper's λ2 values lie around 0.6–1.3; choose λ2 for a target mean budget with
    :func:`calibrate_lambda` **[paper, Eq. 19]**."""
    return relative_keep(scores, register_score, lambda2)


# -- budget matching ----------------------------------------------------------------------------
class LambdaFit(NamedTuple):
    """Result of :func:`calibrate_lambda`: the chosen λ, the mean kept count it achieves on the
    calibration samples, and the spread (population std) of the per-sample counts."""

    lam: float
    mean: float
    std: float


def _stats(counts) -> tuple[float, float]:
    c = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if c.numel() == 0:
        raise ValueError("count_fn returned no counts")
    return float(c.mean()), float(c.std(unbiased=False)) if c.numel() > 1 else 0.0


def calibrate_lambda(count_fn: Callable[[float], Sequence[int] | torch.Tensor], target: float,
                     lo: float = 0.0, hi: float = 4.0, iters: int = 40, tol: float = 0.5) -> LambdaFit:
    """Bisection for λ so that the mean kept count hits ``target`` **[paper, Eq. 19]**:
    ``λ* = argmin_λ |mean_samples |S(λ)| − K̄|``.

    count_fn(λ) returns the per-sample kept counts (register included if the budget counts it — the
    spec counts it **[decision]**); the mean must be non-increasing in λ (true for the relative rule).
    The search keeps ``[lo, hi]`` bracketing the target, stops when ``|mean − target| <= tol`` or after
    ``iters`` evaluations, and returns the best λ seen. If the target lies outside what ``[lo, hi]``
    can reach, the closer end is returned — always check the returned ``mean``.
    """
    if not lo <= hi:
        raise ValueError(f"need lo <= hi, got lo={lo}, hi={hi}")
    best: LambdaFit | None = None

    def consider(lam: float) -> LambdaFit:
        nonlocal best
        m, s = _stats(count_fn(lam))
        fit = LambdaFit(float(lam), m, s)
        if best is None or abs(m - target) < abs(best.mean - target):
            best = fit
        return fit

    f_lo = consider(lo)
    if f_lo.mean <= target or abs(f_lo.mean - target) <= tol:  # even the mildest λ keeps too little
        return best
    f_hi = consider(hi)
    if f_hi.mean >= target or abs(f_hi.mean - target) <= tol:  # even the strongest λ keeps too much
        return best
    a, b = lo, hi
    for _ in range(max(0, iters - 2)):
        mid = 0.5 * (a + b)
        fit = consider(mid)
        if abs(fit.mean - target) <= tol:
            break
        if fit.mean > target:
            a = mid  # keeps too many: raise λ
        else:
            b = mid
    return best
