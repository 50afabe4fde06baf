"""OccamToken budget calibration: fit λ2 (or λ1) so that the mean kept count hits a target.

The paper picks λ2 on 50-100 calibration samples so the mean number of kept tokens (register
included) matches a budget K̄ (Eq. 19). The kept count is monotone in λ, and the scores a threshold
is compared with do not depend on λ itself: one pass with λ = 0 records every token's score ratio
s(v)/s(r), after which count(λ) = #{ratio ≥ λ} + registers is exact arithmetic, so bisection needs
no further model runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .methods._occam_scores import calibrate_lambda


@dataclass
class BudgetFit:
    stage: int
    lam: float
    mean_kept: float  # register(s) included
    std_kept: float
    target: float
    samples: int

    def __str__(self) -> str:
        name = "λ2" if self.stage == 2 else "λ1"
        return (f"{name} = {self.lam:.4f}: mean kept {self.mean_kept:.2f} ± {self.std_kept:.2f} tokens per sample "
                f"(target {self.target}, {self.samples} samples, registers included)")


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
                out += [(im.info["stage1_ratios"], im.registers) for im in stats.images]
            else:
                registers = [im.registers for im in stats.images]  # one image per sample assumed
                for b, layers in sorted(stats.llm_info.items()):
                    info = next(iter(layers.values()))
                    out.append((info["stage2_ratios"], registers[b] if b < len(registers) else 1))
    return out


def fit_lambda(ratios: list[tuple[list[float], int]], target: float, stage: int = 2, hi: float | None = None) -> BudgetFit:
    """Bisection on recorded ratios for a target mean kept count (registers included)."""
    if not ratios:
        raise ValueError("No calibration samples.")
    tensors = [(torch.tensor(r, dtype=torch.float64), reg) for r, reg in ratios]
    top = hi if hi is not None else max(float(t.max()) for t, _ in tensors if t.numel()) * 1.01 + 1e-9

    def counts(lam: float) -> list[int]:
        return [int((t >= lam).sum()) + reg for t, reg in tensors]

    fit = calibrate_lambda(counts, target, lo=0.0, hi=top)
    return BudgetFit(stage=stage, lam=float(fit.lam), mean_kept=float(fit.mean), std_kept=float(fit.std),
                     target=target, samples=len(tensors))


def calibrate_budget(model, batches: Iterable[dict], target: float, stage: int = 2, **occam_kwargs) -> BudgetFit:
    """Fit λ2 (stage=2, λ1 fixed by ``occam_kwargs``) or λ1 (stage=1, stage II off) so that the mean
    kept count per sample, registers included, is ``target``."""
    return fit_lambda(score_ratios(model, batches, stage, **occam_kwargs), target, stage)


# -- command line ----------------------------------------------------------------------------------
def add_cli(subparsers) -> None:
    """``vtprune calibrate registers`` and ``vtprune calibrate budget``."""
    from .registers import add_calibrate_registers_arguments, calibrate_registers_cli

    group = subparsers.add_parser("calibrate", help="calibrate OccamToken: register neurons, λ for a budget")
    sub = group.add_subparsers(dest="what", required=True)
    registers = sub.add_parser("registers", help="find the test-time register neurons of a vision tower")
    add_calibrate_registers_arguments(registers)
    registers.set_defaults(func=calibrate_registers_cli)

    budget = sub.add_parser("budget", help="fit λ2 (or λ1) so the mean kept count hits a target")
    budget.add_argument("--model", required=True, help="local path of a supported HF VLM")
    budget.add_argument("--images", help="folder of calibration images (with --prompt)")
    budget.add_argument("--prompt", default="Describe the image.", help="question asked about each image")
    budget.add_argument("--scenes", type=int, default=0, help="use N scenes of the demo benchmark instead of --images")
    budget.add_argument("--num", type=int, default=64, help="calibration samples (default 64)")
    budget.add_argument("--target", type=float, required=True, help="target mean kept tokens per image, registers included")
    budget.add_argument("--stage", type=int, choices=(1, 2), default=2, help="2: fit λ2 (default); 1: fit λ1")
    budget.add_argument("--lambda1", type=float, default=None, help="λ1 kept fixed while fitting λ2")
    budget.add_argument("--layer", type=int, default=None, help="stage-II layer (default per family)")
    budget.set_defaults(func=_budget_cli)


def _budget_cli(args) -> int:
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    batches = [_processed(processor, image, question) for image, question in
               tqdm(_calibration_items(args), total=args.num, desc="calibration samples")]
    kwargs = {k: v for k, v in (("lambda1", args.lambda1), ("layer", args.layer)) if v is not None}
    fit = calibrate_budget(model, batches, args.target, stage=args.stage, **kwargs)
    print(fit)
    return 0


def _calibration_items(args):
    if args.scenes:
        from .demo.scenes import make_split

        for item in make_split("val", min(args.scenes, args.num)):
            yield item.image(), item.question
        return
    if not args.images:
        raise SystemExit("vtprune calibrate budget: pass --images DIR (with --prompt) or --scenes N")
    from pathlib import Path

    from PIL import Image

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise SystemExit(f"vtprune calibrate budget: no images in {args.images}")
    for path in files[: args.num]:
        yield Image.open(path).convert("RGB"), args.prompt


def _processed(processor, image, question) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=image, text=prompt, return_tensors="pt"))
