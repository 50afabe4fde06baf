"""``cdpruner`` — "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in
MLLMs" (Zhang et al., NeurIPS 2025, arXiv 2506.10967).

Projected stage, per crop. A conditional determinantal point process over a crop's tokens:

* similarity ``S = cos(x_i, x_j)`` of the projected visual tokens;
* relevance ``r_i`` of each token to the instruction, min–max normalised to (0, 1]
  (``(r - min + 1e-6) / (max - min)``, over all crops of the image together), optionally sharpened as
  ``exp(θ / (2(1-θ)) · r)`` (the paper's θ; off by default, as in the code);
* kernel ``L = diag(r) · S · diag(r)``; the kept set is the greedy MAP of the DPP, computed with the
  incremental Cholesky update of Chen et al. (NeurIPS 2018, "Fast Greedy MAP Inference for DPP").

Official code: Theia-4869/CDPruner, ``LlavaMetaForCausalLM.encode_images`` in ``llava/model/llava_arch.py``
(see ``official_code``); LLaVA only. The LLM sees the kept tokens at contiguous positions.

Relevance (``relevance=``), reported in ``Selection.info['relevance']``:

* ``"clip_text"`` — the official one: the *negated* mean cosine similarity between each token's CLIP image
  embedding (the feature layer through ``post_layernorm`` and ``visual_projection``) and the CLIP text
  tower's embeddings of the instruction (one per 77-token segment). Needs ``text_encoder=PATH``, a local
  CLIP checkpoint (the model's vision tower, e.g. openai/clip-vit-large-patch14-336), loaded once by
  :meth:`CDPruner.load_text_encoder`, and the LLM's tokenizer (``tokenizer=PATH``; by default the
  directory the model was loaded from) to turn the instruction's token ids back into text.
  ``clip_sign=1`` uses the cosine itself, without the official code's negation.
* ``"llm_embeddings"`` — not the official relevance: the mean cosine similarity (not negated) of the
  projected visual tokens to the LLM's input embeddings of the text after the image. Works on every
  family without a text tower.
* ``"off"`` — no relevance: a plain, instruction-agnostic DPP over ``S``.
* ``"auto"`` (default) — ``"clip_text"`` when a ``text_encoder`` is given, else ``"llm_embeddings"``.

When the relevance that runs is not the official one, the method warns once per ``apply`` (per bound method).

With the CLIP relevance and the same embeddings, the kept indices equal the official code's
(``tests/fixtures/parity/cdpruner.json``: LLaVA-1.5 and LLaVA-NeXT-shaped inputs). Remaining differences:

* Instruction text: the official evaluation passes the benchmark's question (with some scripts' suffix
  such as "Answer the question using a single word or phrase." removed); here it is the decoded text after
  the image in the prompt, so the chat template's remainder (e.g. "ASSISTANT:") and any suffix are part
  of it.
* Precision: the official greedy MAP runs in fp32; here it runs in fp64 (ties in fp32 rounding may break
  differently; none occurred in the fixtures). The embeddings of the CLIP relevance are computed in fp32.
* An instruction with no text tokens makes the DPP unconditional (``info['relevance'] = 'none'``).
* If the kernel's rank is exhausted before the budget is met (more tokens than independent directions),
  the remaining picks follow the largest residual gain without further updates, so the method always
  returns exactly the budget (the official update divides by the square root of the vanishing gain and
  yields NaN or inf).
  ``info['degenerate_after']`` (a tensor, one entry per crop with a budget) says after how many picks
  that happened; an entry equal to the crop's budget means never.
* LLaVA-NeXT: the official code gives every crop the same budget (``visual_token_num`` per crop) and
  selects on each crop's full grid, after which unpadding drops the picks that fall into padding. Here
  ``crop_budget="equal"`` (default) splits ``keep`` equally over the crops (the first crops take the
  remainder; a crop never gets more than it holds) and selects among the patches the layout shows, so
  the count is exact; ``crop_budget="proportional"`` splits it in proportion to the crops' token counts.
* Qwen2.5-VL / Qwen3-VL: the official code has no Qwen version and the towers are not CLIP, so only
  ``"llm_embeddings"`` and ``"off"`` apply there.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

from ..errors import ArgumentError
from ..models import families
from .base import Method, Selection, Stage, register_method, split_budget, to_device

_REL_EPS = 1e-9  # a residual below this fraction of the item's own diagonal counts as zero


def greedy_dpp_map(kernel: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy MAP of a DPP with PSD ``kernel`` (N, N): at every step add the item with the largest
    marginal gain ``det(L_{S+i}) / det(L_S)``, kept up to date by an incremental Cholesky
    factorisation. Returns the picked indices in order and, as a 0-d tensor, the number of picks made
    before the gains vanished (``k`` if they never did).

    One step per pick, tensor operations only: nothing is read back to the host, so the loop queues
    its work on a GPU without waiting for it. Once a gain vanishes the factorisation is frozen (the
    update is multiplied out by a mask rather than skipped by a Python ``if``)."""
    n = kernel.shape[0]
    L = kernel.double()
    c = torch.zeros(k, n, dtype=L.dtype, device=L.device)
    d2 = torch.diagonal(L).clone()
    floor = d2.clamp(min=0) * _REL_EPS
    picked = []
    chosen = torch.zeros(n, dtype=torch.bool, device=L.device)
    updated = torch.zeros(k, dtype=torch.bool, device=L.device)  # True while no gain has vanished
    ok = torch.ones(1, dtype=torch.bool, device=L.device)
    for t in range(k):
        j = torch.argmax(d2.masked_fill(chosen, -float("inf"))).view(1)  # ties: lower index
        picked.append(j)
        dj = d2.index_select(0, j)
        ok = ok & (dj > floor.index_select(0, j))  # once False, False for good
        updated[t:t + 1] = ok
        e = (L.index_select(0, j).squeeze(0) - c[:t].index_select(1, j).squeeze(1) @ c[:t]) / torch.sqrt(dj)
        e = torch.where(ok, e, 0.0)  # frozen: c[t] = 0 and d2 unchanged
        c[t] = e
        d2 = d2 - e * e
        chosen.index_fill_(0, j, True)
    return torch.cat(picked), updated.sum()


RelevanceSource = Literal["auto", "clip_text", "llm_embeddings", "off"]


def min_max(r: torch.Tensor) -> torch.Tensor:
    """``(r - min + 1e-6) / (max - min)`` as the official code; constant scores give ones."""
    spread = r.max() - r.min()
    return torch.where(spread > 0, (r - r.min() + 1e-6) / spread, torch.ones_like(r))


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def clip_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor, sign: int = -1) -> torch.Tensor:
    """Official relevance: ``sign`` × cosine of each CLIP image embedding (N, C) to each CLIP text
    embedding (M, C), averaged over M, min–max normalised over all N."""
    cos = unit_rows(image_embeds.float()) @ unit_rows(to_device(text_embeds.float(), image_embeds.device)).T
    return min_max((sign * cos).mean(dim=-1))


def llm_relevance(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each projected token (N, D) to the LLM embeddings of the instruction (T, D),
    min–max normalised."""
    sim = unit_rows(features.float()) @ unit_rows(to_device(text.float(), features.device)).T
    return min_max(sim.mean(dim=1))


def sharpen(r: torch.Tensor, theta: float | None) -> torch.Tensor:
    return r if theta is None else torch.exp(theta / (2 * (1 - theta)) * r)


def similarity(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the projected tokens (normalised in their own dtype, then fp32, as the
    official code)."""
    xn = unit_rows(features).float()
    return xn @ xn.T


def equal_split(total: int, sizes: list[int]) -> list[int]:
    """``total`` split equally over groups of ``sizes`` (the first groups take the remainder), never more
    than a group holds: a group too small for its share passes the rest on to the others."""
    by_size = sorted(sizes)
    level = total  # every group gets min(its size, level)
    for rank, size in enumerate(by_size):  # crops, smallest first
        share = (total - sum(by_size[:rank])) // (len(sizes) - rank)
        if size >= share:
            level = share
            break
    out = [min(size, level) for size in sizes]
    left = total - sum(out)
    for i in range(len(sizes)):  # crops: the remainder, one each to the first crops with room
        extra = min(left, sizes[i] - out[i], 1)
        out[i] += extra
        left -= extra
    return out


@register_method
class CDPruner(Method):
    name = "cdpruner"
    needs_budget = True
    stages = (Stage.PROJECTED,)
    default_positions = "contiguous"
    official_code = ("Theia-4869/CDPruner@9541616c40fcd5625de1cdb8ea6c33c129eb7864 "
                     "llava/model/llava_arch.py::LlavaMetaForCausalLM.encode_images")

    def __init__(self, keep: int | None = None, ratio: float | None = None,
                 relevance: RelevanceSource = "auto", text_encoder: str | None = None,
                 tokenizer: str | None = None, clip_sign: Literal[-1, 1] = -1,
                 crop_budget: Literal["equal", "proportional"] = "equal",
                 theta: float | None = None, seed: int = 0):
        super().__init__(keep=keep, ratio=ratio, seed=seed)
        if theta is not None and not 0.0 <= theta < 1.0:
            raise ArgumentError(f"cdpruner: theta={theta!r} is not allowed; theta lies in [0, 1).")
        if relevance == "clip_text" and text_encoder is None:
            raise ArgumentError("cdpruner: relevance='clip_text' needs text_encoder=PATH, a local CLIP checkpoint "
                                "directory (e.g. openai/clip-vit-large-patch14-336 saved with save_pretrained).")
        if text_encoder is not None and relevance in ("llm_embeddings", "off"):
            raise ArgumentError(f"cdpruner: text_encoder is only used by relevance='clip_text', not {relevance!r}.")
        self.relevance = relevance
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.clip_sign = clip_sign
        self.crop_budget = crop_budget
        self.theta = theta
        self.clip = None  # the loaded ClipTextRelevance (load_text_encoder)
        self._warned = False

    # -- resources -----------------------------------------------------------------------------
    @property
    def relevance_source(self) -> str:
        """The relevance this instance runs: "clip_text", "llm_embeddings" or "off"."""
        if self.relevance != "auto":
            return self.relevance
        return "clip_text" if self.text_encoder is not None or self.clip is not None else "llm_embeddings"

    def load_text_encoder(self, tokenizer: str | None = None) -> None:
        """Load the CLIP text tower, its tokenizer, the vision projection and the LLM's tokenizer, once."""
        if self.clip is not None:
            return
        tokenizer = self.tokenizer or tokenizer
        if not tokenizer:
            raise ArgumentError("cdpruner: relevance='clip_text' needs the LLM's tokenizer to read the instruction; "
                                "pass tokenizer=PATH (a local directory).")
        from ._clip_text import ClipTextRelevance

        self.clip = ClipTextRelevance(self.text_encoder, tokenizer)

    def resolve(self, family: str, num_layers: int) -> None:
        super().resolve(family, num_layers)
        if self.relevance_source == "clip_text" and "cls_attention" not in families.get(family).capabilities:
            raise ArgumentError(f"cdpruner: relevance='clip_text' needs a CLIP vision tower (LLaVA); {family} has "
                                "none. Use relevance='llm_embeddings' or 'off'.")

    def load_resources(self, adapter) -> None:
        if self.relevance_source == "clip_text":
            self.load_text_encoder(getattr(adapter.model, "name_or_path", None))

    # -- selection -----------------------------------------------------------------------------
    def relevance_scores(self, ctx, mode: str) -> torch.Tensor:
        """(N,) relevance of every candidate of the image (all crops together)."""
        if mode == "clip_text":
            if self.clip is None:
                self.load_text_encoder()
            image_embeds, text_embeds = self.clip.embeddings(ctx.vision_features, ctx.instruction_ids)
            r = clip_relevance(image_embeds, text_embeds, self.clip_sign)
        else:
            r = llm_relevance(ctx.features, ctx.text_embeddings)
        return sharpen(r, self.theta)

    def kernel(self, features: torch.Tensor, relevance: torch.Tensor | None) -> torch.Tensor:
        sim = similarity(features)
        return sim if relevance is None else relevance[:, None] * sim * relevance[None, :]

    def crop_budgets(self, total: int, sizes: list[int]) -> list[int]:
        return equal_split(total, sizes) if self.crop_budget == "equal" else split_budget(total, sizes)

    def _mode(self, ctx) -> str:
        mode = self.relevance_source
        if mode == "llm_embeddings" and ctx.text_embeddings.shape[0] == 0:
            mode = "none"
        if mode == "clip_text" and ctx.instruction_ids.numel() == 0:
            mode = "none"
        if mode != "clip_text" and not self._warned:
            self._warned = True
            warnings.warn(f"cdpruner: relevance={mode!r} ran, not the official CLIP text-tower relevance "
                          "(pass text_encoder=PATH for relevance='clip_text').", stacklevel=3)
        return mode

    def select_projected(self, ctx):
        total = self.budget(ctx.num_tokens)
        mode = self._mode(ctx)
        relevance = self.relevance_scores(ctx, mode) if mode in ("clip_text", "llm_embeddings") else None
        sizes = [sl.stop - sl.start for sl in ctx.crop_slices]
        keeps, degenerate = [], []
        for sl, budget in zip(ctx.crop_slices, self.crop_budgets(total, sizes)):
            if budget == 0:
                continue
            crop_relevance = None if relevance is None else relevance[sl]
            picked, deg = greedy_dpp_map(self.kernel(ctx.features[sl], crop_relevance), budget)
            keeps.append(picked + sl.start)
            degenerate.append(deg)
        keep = torch.sort(torch.cat(keeps)).values
        # per crop with a budget: the picks made before the gains vanished (= its budget if never)
        return Selection(keep=keep, info={"relevance": mode, "degenerate_after": torch.stack(degenerate)})


def log_det(kernel: torch.Tensor, subset: torch.Tensor) -> float:
    """log det of the kernel restricted to ``subset`` (a helper for tests and diagnostics)."""
    sub = kernel.double()[subset][:, subset]
    sign, value = torch.linalg.slogdet(sub)
    return float(value) if float(sign) > 0 else -math.inf  # sync: a diagnostic returning a float, never called while pruning
