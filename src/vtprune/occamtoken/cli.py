"""``vtprune calibrate registers`` (the register neurons of a vision tower) and ``vtprune calibrate
budget`` (λ2 or λ1 for a target mean kept count)."""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ArgumentError, InputError
from .budget import FIXED_PROMPT, Pair, calibrate_pairs, folder_pairs, format_table, read_pairs, scene_pairs
from .neuron_cache import cache_path, default_cache_dir
from .neuron_search import calibrate_register_neurons
from .tower_loading import load_vision_tower
from .towers import RegisterTower, resolve_tower


def add_cli(subparsers) -> None:
    """``vtprune calibrate registers`` and ``vtprune calibrate budget``."""
    group = subparsers.add_parser("calibrate", help="calibrate OccamToken: register neurons, λ for a budget")
    sub = group.add_subparsers(dest="what", required=True)
    registers = sub.add_parser("registers", help="find the test-time register neurons of a vision tower")
    add_calibrate_registers_arguments(registers)
    registers.set_defaults(func=calibrate_registers_cli)

    budget = sub.add_parser("budget", help="fit λ2 (or λ1) so the mean kept count hits a target")
    budget.add_argument("--model", required=True, help="local path of a supported HF VLM")
    source = budget.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", help='JSONL file, one {"image": PATH, "question": TEXT} per line: samples of '
                                        "the target task (paths relative to the file's folder)")
    source.add_argument("--images", help="folder of calibration images, all asked --prompt")
    source.add_argument("--scenes", type=int, help="use N validation scenes of the demo benchmark, with their questions")
    budget.add_argument("--prompt", default=FIXED_PROMPT, help=f"question asked about each --images image "
                                                               f"(default {FIXED_PROMPT!r})")
    budget.add_argument("--num", type=int, default=None, help="at most N samples (default: all pairs, 64 images)")
    budget.add_argument("--target", required=True,
                        help="target mean kept tokens per sample, registers included; several: 192,128,64")
    budget.add_argument("--stage", type=int, choices=(1, 2), default=2, help="2: fit λ2 (default); 1: fit λ1")
    budget.add_argument("--lambda1", type=float, default=None,
                        help="λ1 kept fixed while fitting λ2 (default: the model's shipped setting, else the family's)")
    budget.add_argument("--layer", type=int, default=None,
                        help="stage-II layer (default: the model's shipped setting, else the family's)")
    budget.add_argument("--out", default=None, help="also write the fits to this JSON file")
    budget.set_defaults(func=_budget_cli)


def parse_targets(text: str) -> list[float]:
    """``"192,128,64"`` -> ``[192.0, 128.0, 64.0]``."""
    try:
        targets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        targets = []
    if not targets or any(t <= 0 for t in targets):
        raise ArgumentError(f"--target {text!r}: give one or more positive numbers, e.g. --target 64 or --target 192,128,64.")
    return targets


def _budget_cli(args) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    targets = parse_targets(args.target)
    if args.num is not None and args.num < 1:
        raise ArgumentError(f"--num {args.num}: give at least 1 sample.")
    if not Path(args.model).is_dir():
        raise InputError(f"--model {args.model!r} is not a folder; give the local folder of a transformers "
                         f"checkpoint (vtprune does not download models).")
    pairs, source = _calibration_pairs(args)
    settings = _occam_settings(args) if args.stage == 2 else {}  # stage 1 runs without stage II
    if args.stage == 2 and args.images:
        print(f"note: stage II depends on the question, and every image here is asked {args.prompt!r}; "
              f"the λ2 fitted may miss the budget on your task's questions. Calibrate with --pairs FILE.jsonl "
              f"(images with their task's questions) for the paper's calibration.")
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    fits = calibrate_pairs(model, processor, pairs, targets, stage=args.stage, progress=True, **settings)
    fixed = ", ".join(f"{k}={v}" for k, v in settings.items()) or "the family defaults"
    print(f"{source}, {len(pairs)} samples; " + (f"OccamToken settings: {fixed}" if args.stage == 2 else "stage II off"))
    print(fits[0] if len(fits) == 1 else format_table(fits))
    for fit in fits:
        if not fit.reached:
            print(f"note: target {fit.target:g} is out of reach on these samples; the closest mean is "
                  f"{fit.mean_kept:.2f} ({fit.name} = {fit.lam:.4f}).")
    if args.out:
        record = {"model": args.model, "source": source, "stage": args.stage, "settings": settings,
                  "fits": [{**asdict(f), "parameter": "lambda2" if f.stage == 2 else "lambda1", "reached": f.reached}
                           for f in fits]}
        Path(args.out).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")
    return 0


def _calibration_pairs(args) -> tuple[list[Pair], str]:
    """The pairs to calibrate on, and a few words saying where they come from."""
    if args.pairs:
        pairs, source = read_pairs(args.pairs), f"pairs from {args.pairs}"
    elif args.images:
        pairs, source = folder_pairs(args.images, args.prompt)[: args.num or 64], f"images of {args.images}"
    else:
        if args.scenes < 1:
            raise ArgumentError(f"--scenes {args.scenes}: give at least 1 scene.")
        pairs, source = scene_pairs(args.scenes), "demo scenes"
    return pairs[: args.num] if args.num else pairs, source


def _occam_settings(args) -> dict:
    """λ1 and the stage-II layer to fit λ2 with: the flags, else the OccamToken settings shipped next to
    the model's weights (what ``vtprune generate`` and ``vtprune demo`` run with), else none."""
    from ..cli.arguments import default_method_args

    shipped = default_method_args("occamtoken", args.model)
    settings = {k: shipped[k] for k in ("lambda1", "layer") if k in shipped}
    settings.update({k: v for k, v in (("lambda1", args.lambda1), ("layer", args.layer)) if v is not None})
    return settings


# -- calibrate registers ---------------------------------------------------------------------------
_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _image_files(folder: Path, count: int, seed: int) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"--images {str(folder)!r} is not a directory.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXT and p.is_file())
    if not files:
        raise InputError(f"No images ({', '.join(sorted(_IMAGE_EXT))}) found under {str(folder)!r}.")
    if count and count < len(files):
        files = sorted(random.Random(seed).sample(files, count))
    return files


def _processor_batches(model_path: Path, files: list[Path], batch_size: int, tower: RegisterTower) -> Iterator[Any]:
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
    t = resolve_tower(tower)
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
