"""OccamToken budget calibration: fit λ2 (or λ1) so that the mean kept count hits a target.

The paper picks λ2 on 50-100 calibration samples of the target task, each an image with its question,
so the mean number of kept tokens (register included) matches a budget K̄ (Eq. 19). Stage II scores a
token by the attention the question's tokens pay it, so its kept count depends on the question: a λ2
fitted on one fixed prompt misses the budget on the task's own questions. The kept count is monotone
in λ, and the scores a threshold is compared with do not depend on λ itself: one pass with λ = 0
records every token's score ratio s(v)/s(r), after which count(λ) = #{ratio ≥ λ} + registers is exact
arithmetic, so bisection needs no further model runs and one pass serves every target.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import InputError
from .scores import calibrate_lambda

FIXED_PROMPT = "Describe the image."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PAIRS_FORMAT = 'one JSON object per line: {"image": PATH, "question": TEXT}'


@dataclass
class BudgetFit:
    stage: int
    lam: float
    mean_kept: float  # register(s) included
    std_kept: float
    min_kept: int
    max_kept: int
    target: float
    samples: int

    @property
    def name(self) -> str:
        return "λ2" if self.stage == 2 else "λ1"

    @property
    def reached(self) -> bool:
        """Whether the mean is within half a token of the target (the bisection's tolerance); a target
        above what λ = 0 keeps, or below the registers alone, is not."""
        return abs(self.mean_kept - self.target) <= 0.5

    def __str__(self) -> str:
        return (f"{self.name} = {self.lam:.4f}: mean kept {self.mean_kept:.2f} ± {self.std_kept:.2f} "
                f"(min {self.min_kept}, max {self.max_kept}) tokens per sample "
                f"(target {self.target:g}, {self.samples} samples, registers included)")


@dataclass(frozen=True)
class Pair:
    """A calibration sample: an image (a file, or a PIL image) and the question asked about it."""

    image: Any
    question: str


def score_ratios(model, batches: Iterable[dict], stage: int = 2, **occam_kwargs) -> list[tuple[list[float], int]]:
    """Per sample: the score ratios of its candidate tokens at ``stage`` and its register count."""
    import vtprune

    if stage not in (1, 2):
        raise ValueError("stage must be 1 or 2")
    kwargs = dict(occam_kwargs)
    if stage == 2:
        kwargs["lambda2"] = 0.0  # keep everything in stage II, record the ratios
    else:
        kwargs.update(lambda1=0.0, stage2=False)
    out: list[tuple[list[float], int]] = []
    with vtprune.pruned(model, "occamtoken", **kwargs) as handle, torch.no_grad():
        for batch in batches:
            handle.reset_stats()
            model(**batch)
            stats = handle.last
            if stage == 1:
                out += [(_floats(im.info["stage1_ratios"]), im.registers) for im in stats.images]
            else:
                for b, image in enumerate(stats.images):  # one image per sample assumed
                    layers = stats.llm_info.get(b, {})  # none when stage I left no patch to score
                    ratios = _floats(next(iter(layers.values()))["stage2_ratios"]) if layers else []
                    out.append((ratios, image.registers))
    return out


def _floats(values) -> list[float]:
    """The method records its ratios as a tensor on the model's device (reading them back during the
    prefill would stall it); they become Python floats here, after the forward."""
    return values.tolist() if torch.is_tensor(values) else list(values)


def fit_lambda(ratios: list[tuple[list[float], int]], target: float, stage: int = 2, hi: float | None = None) -> BudgetFit:
    """Bisection on recorded ratios for a target mean kept count (registers included)."""
    if not ratios:
        raise ValueError("No calibration samples.")
    tensors = [(torch.tensor(r, dtype=torch.float64), reg) for r, reg in ratios]
    scored = [float(t.max()) for t, _ in tensors if t.numel()]
    if hi is None and not scored:
        raise InputError("No calibration sample has a token to score: stage I kept no patch of any image "
                         "(lower λ1, or pass min_kept=N).")
    top = hi if hi is not None else max(scored) * 1.01 + 1e-9

    def counts(lam: float) -> list[int]:
        return [int((t >= lam).sum()) + reg for t, reg in tensors]

    fit = calibrate_lambda(counts, target, lo=0.0, hi=top)
    kept = counts(fit.lam)
    return BudgetFit(stage=stage, lam=float(fit.lam), mean_kept=float(fit.mean), std_kept=float(fit.std),
                     min_kept=min(kept), max_kept=max(kept), target=target, samples=len(tensors))


def calibrate_budget(model, batches: Iterable[dict], target: float, stage: int = 2, **occam_kwargs) -> BudgetFit:
    """Fit λ2 (stage=2, λ1 fixed by ``occam_kwargs``) or λ1 (stage=1, stage II off) so that the mean
    kept count per sample, registers included, is ``target``."""
    return fit_lambda(score_ratios(model, batches, stage, **occam_kwargs), target, stage)


def calibrate_pairs(model, processor, pairs: Sequence[Pair], targets: Sequence[float], stage: int = 2,
                    progress: bool = False, **occam_kwargs) -> list[BudgetFit]:
    """One fit per target on (image, question) pairs, each prompted through the model's chat template.
    The model runs once per pair; the fits are arithmetic on the recorded ratios."""
    from tqdm import tqdm

    batches = (_processed(processor, load_image(p.image), p.question)
               for p in tqdm(pairs, desc="calibration samples", disable=not progress))
    ratios = score_ratios(model, batches, stage, **occam_kwargs)
    return [fit_lambda(ratios, float(t), stage) for t in targets]


def format_table(fits: Sequence[BudgetFit]) -> str:
    """The fits as a table, one row per target."""
    rows = [["target", fits[0].name, "mean kept", "std", "min", "max", "samples"]]
    rows += [[f"{f.target:g}", f"{f.lam:.4f}", f"{f.mean_kept:.2f}", f"{f.std_kept:.2f}", str(f.min_kept),
              str(f.max_kept), str(f.samples)] for f in fits]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


# -- calibration samples ---------------------------------------------------------------------------
def read_pairs(path) -> list[Pair]:
    """The pairs of a JSONL file, one ``{"image": PATH, "question": TEXT}`` per line (blank lines
    skipped); relative image paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--pairs {str(path)!r} is not a file; give a JSONL file, {PAIRS_FORMAT}.")
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [_parse_pair(line, number, path) for number, line in enumerate(lines, 1) if line.strip()]
    if not pairs:
        raise InputError(f"{path} holds no calibration pairs; write {PAIRS_FORMAT}.")
    return pairs


def _parse_pair(line: str, number: int, path: Path) -> Pair:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where} is not valid JSON ({err.msg}); write {PAIRS_FORMAT}.") from None
    if not isinstance(record, dict):
        raise InputError(f"{where} is not a JSON object; write {PAIRS_FORMAT}.")
    for key in ("image", "question"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise InputError(f"{where} lacks {key!r} (a non-empty string); write {PAIRS_FORMAT}.")
    image = Path(record["image"]).expanduser()
    image = image if image.is_absolute() else path.parent / image
    if not image.is_file():
        raise InputError(f"{where}: the image {str(image)!r} is not a file.")
    return Pair(image, record["question"])


def folder_pairs(folder, prompt: str = FIXED_PROMPT) -> list[Pair]:
    """Every image of ``folder`` (sorted by name) with the same prompt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--images {str(folder)!r} is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"--images {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    return [Pair(f, prompt) for f in files]


def scene_pairs(n: int) -> list[Pair]:
    """``n`` validation scenes of the demo benchmark, each with its own question."""
    from ..demo.scenes import make_split

    return [Pair(item.image(), item.question) for item in make_split("val", n)]


def load_image(image):
    """An RGB PIL image from a path, or the PIL image itself."""
    if not isinstance(image, (str, Path)):
        return image
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(image).convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"cannot read the image {str(image)!r} ({err}).") from None


def _processed(processor, image, question) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=image, text=prompt, return_tensors="pt"))
