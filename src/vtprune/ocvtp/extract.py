"""Feature extraction for OC-VTP training: a VLM's own vision tower, one middle layer, stored once.

Li, Zhao, Deng, Wang, Pajarinen, "Object-Centric Vision Token Pruning for Vision Language Models",
arXiv 2511.20439: the pruner is trained on the hidden states after block 9 of LLaVA-1.5's 24-block CLIP
tower (HF ``hidden_states[9]``), CLS removed, computed once over an image folder (COCO train2017).

The tokens are read through the same vtprune adapter code that feeds the pruner at inference
(``ctx.hidden(layer - 1)``), so training and inference see identical features:

* LLaVA-1.5 / LLaVA-NeXT: the image processor's base view (the whole image at the tower's input size;
  for LLaVA-NeXT the first "crop" of the processor's output), patch tokens in raster order, no CLS.
  Preprocessing: by default the model's own image processor (for the HF LLaVA processors: shortest side
  to 336, centre crop), because that is what produces the tokens the pruner reads at inference — the
  training distribution should be the inference one. The public code's ``get_training_only_data.py``
  instead squashes every image to 336 × 336 (bicubic, aspect ratio lost) before LLaVA's
  ``process_images``; ``squash=True`` (``vtprune ocvtp extract --squash``) does the same. The two agree
  on square images (the demo scenes); on COCO photos the squash keeps the image borders that the crop
  drops but distorts shapes.
* Qwen2.5-VL / Qwen3-VL: merged units (mean of each 2×2 group of patch features) in raster order. The
  towers take any resolution; images are resized to ``image_size`` × ``image_size`` (a multiple of
  patch × merge, default 448) so that every image has the same token count.

Storage (the public code used LMDB; ours is a format a user can inspect): ``index.json`` plus fp16
safetensors shards ``shard-00000.safetensors`` … each holding ``features`` (images, tokens, width).
A shard is written whole and recorded in the index afterwards, so an interrupted run resumes by
skipping the shards already recorded (their sources must match).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..errors import InputError
from ..methods.base import Method, Selection, Stage
from ..models.families import tower_group

INDEX_NAME = "index.json"
FORMAT = "vtprune-ocvtp-features"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DEFAULT_QWEN_IMAGE_SIZE = 448
PAPER_LAYER, PAPER_DEPTH = 9, 24


# -- the tower --------------------------------------------------------------------------------
def _family(model) -> str:
    from ..models import family_of

    return family_of(model)


def _is_qwen(family: str) -> bool:  # a merged-patch tower (no fixed input size): the family's merge factor
    from ..models.families import get

    return get(family).merge_factor > 1


def _anyres(family: str) -> bool:
    from ..models.families import get

    return get(family).anyres


def tower_module(model):
    return _adapter(model).vision_module  # the family's adapter knows where its tower is


def tower_depth(model) -> int:
    """Number of encoder blocks of the model's vision tower."""
    return _adapter(model).vision_depth


def tower_width(model) -> int:
    return int(model.config.vision_config.hidden_size)


def default_layer(depth: int) -> int:
    """The paper's relative depth: block 9 of 24 → ``round(0.375 · depth)``, at least 1."""
    return max(1, min(depth, int(round(PAPER_LAYER * depth / PAPER_DEPTH))))


def check_layer(model, layer: int) -> int:
    depth = tower_depth(model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= depth:
        raise InputError(f"layer must be an encoder block of the vision tower, 1..{depth} "
                         f"(hidden_states index; the paper uses 9 of 24), got {layer!r}.")
    return layer


def _patch_weight(model) -> torch.Tensor | None:
    for name, p in tower_module(model).named_parameters():
        if "patch" in name and p.dim() >= 2:
            return p
    return None


def tower_identity(model) -> dict[str, Any]:
    """What identifies a vision tower for OC-VTP checkpoints: family, width, depth, patch size, input
    size, and the mean/std of the patch-embedding weights (stable under dtype casts)."""
    vc = model.config.vision_config
    ident: dict[str, Any] = {
        "family": _family(model),
        "model_type": getattr(vc, "model_type", None),
        "hidden_size": int(vc.hidden_size),
        "depth": tower_depth(model),
        "patch_size": int(vc.patch_size),
        "image_size": getattr(vc, "image_size", None),
    }
    w = _patch_weight(model)
    if w is not None:
        w = w.detach().double()
        ident["patch_weight_mean"] = float(f"{float(w.mean()):.6g}")
        ident["patch_weight_std"] = float(f"{float(w.std()):.6g}")
    return ident


def same_tower(a: dict, b: dict) -> bool:
    """Whether two :func:`tower_identity` records describe the same tower (weights within 1 %)."""
    keys = ("hidden_size", "depth", "patch_size", "image_size")
    if any(a.get(k) != b.get(k) for k in keys):
        return False
    fams = {a.get("family"), b.get("family")}
    if len({tower_group(f) for f in fams}) != 1:  # families sharing a tower (LLaVA-NeXT uses LLaVA-1.5's CLIP)
        return False
    if "patch_weight_std" in a and "patch_weight_std" in b:
        sa, sb = a["patch_weight_std"], b["patch_weight_std"]
        if abs(sa - sb) > 1e-2 * max(abs(sa), abs(sb), 1e-12):
            return False
        if abs(a["patch_weight_mean"] - b["patch_weight_mean"]) > 1e-2 * max(abs(sa), 1e-12):
            return False
    return True


class _Capture(Method):
    """A method-less pass through the adapter: records ``ctx.hidden(layer - 1)`` of each image and keeps
    every token (not registered)."""

    name = "_ocvtp_capture"
    stages = (Stage.VISION,)

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer
        self.tokens: list[torch.Tensor] = []

    def select_vision(self, ctx):
        self.tokens.append(ctx.hidden(self.layer - 1).detach())
        return Selection(keep=torch.arange(ctx.num_tokens, device=ctx.features.device))


def _adapter(model):
    from ..models import adapter_for

    from ..models.families import family_of_model

    single_view = family_of_model(model).extract_adapter  # e.g. LLaVA-NeXT: the base view, no AnyRes crops
    return single_view(model) if single_view is not None else adapter_for(model)


@torch.no_grad()
def tower_tokens(model, inputs: dict, layer: int) -> list[torch.Tensor]:
    """Per image, the (N, d) hidden states after block ``layer`` at the candidate positions — exactly
    what the ``ocvtp`` method reads at inference. ``inputs``: ``pixel_values`` (LLaVA: (B, 3, H, W);
    Qwen: the processor's patches) and, for Qwen, ``image_grid_thw``."""
    check_layer(model, layer)
    capture = _Capture(layer)
    adapter = _adapter(model)
    n = adapter.num_images(inputs)
    adapter.encode_images(inputs, capture, [None] * n, contextlib.nullcontext)
    return capture.tokens


# -- images ------------------------------------------------------------------------------------
def load_processor(model, path: str | os.PathLike | None = None):
    """The model's image processor, from ``path`` (default: the path the model was loaded from)."""
    from transformers import AutoImageProcessor

    source = path or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise InputError("No image processor given and the model does not say where it was loaded from; "
                         "pass processor=AutoImageProcessor.from_pretrained(PATH).")
    try:
        return AutoImageProcessor.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise InputError(f"No image processor could be loaded from {source}: {e}. Save the model's processor "
                         f"next to its weights (processor.save_pretrained(PATH)) or pass processor=.") from None


def _open(item):
    from PIL import Image

    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as im:
            return im.convert("RGB")
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    raise InputError(f"Expected a PIL image or an image path, got {type(item).__name__}.")


def qwen_image_size(model, image_size: int | None) -> int:
    vc = model.config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    size = image_size or DEFAULT_QWEN_IMAGE_SIZE
    if size % unit:
        raise InputError(f"image_size must be a multiple of patch × merge = {unit} for this tower, got {size}.")
    return size


def preprocess(model, processor, images: list, image_size: int | None = None,
               squash: bool = False) -> tuple[dict, tuple[int, int]]:
    """Model inputs for the tower and the token grid (rows, cols) of every image. ``squash`` (LLaVA
    families) resizes each image to the tower's square input (bicubic) first, as the public code's
    feature extraction does."""
    family = _family(model)
    vc = model.config.vision_config
    pil = [_open(im) for im in images]
    if squash and not _is_qwen(family):
        from PIL import Image

        pil = [im.resize((vc.image_size, vc.image_size), Image.BICUBIC) for im in pil]
    if _is_qwen(family):
        size = qwen_image_size(model, image_size)
        pil = [im.resize((size, size)) for im in pil]
        out = processor(images=pil, return_tensors="pt")
        grid = out["image_grid_thw"]
        expected = torch.tensor([1, size // vc.patch_size, size // vc.patch_size])
        if not bool((grid == expected).all()):
            raise InputError(f"The image processor resized the {size}×{size} images to grids {grid.tolist()}; "
                             f"choose an image_size within its min/max pixels.")
        merge = vc.spatial_merge_size
        return ({"pixel_values": out["pixel_values"], "image_grid_thw": grid},
                (int(expected[1]) // merge, int(expected[2]) // merge))
    side = vc.image_size
    if image_size not in (None, side):
        raise InputError(f"The {family} tower takes {side}×{side} images; image_size cannot change that.")
    if _anyres(family):  # the base view only
        out = processor(images=pil, return_tensors="pt", image_grid_pinpoints=[[side, side]])
        pixels = out["pixel_values"][:, 0]  # the base view
    else:
        pixels = processor(images=pil, return_tensors="pt")["pixel_values"]
    if tuple(pixels.shape[-2:]) != (side, side):
        raise InputError(f"The image processor produced {tuple(pixels.shape[-2:])} images; the tower takes "
                         f"{side}×{side}. Use the model's own processor.")
    g = side // vc.patch_size
    return {"pixel_values": pixels}, (g, g)


# -- storage -----------------------------------------------------------------------------------
def read_index(out_dir: str | Path) -> dict:
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise InputError(f"No feature index at {path}; run `vtprune ocvtp extract` first.")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise InputError(f"{path} is not an OC-VTP feature index.")
    return index


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class FeatureWriter:
    """Writes fp16 shards and keeps ``index.json`` current; resumes from the shards recorded there."""

    def __init__(self, out_dir: str | Path, *, layer: int, dim: int, num_tokens: int | None = None,
                 grid: tuple[int, int] | None = None, tower: dict | None = None, shard_size: int = 256,
                 extra: dict | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        path = self.out / INDEX_NAME
        if path.is_file():
            index = read_index(self.out)
            for key, value in (("layer", layer), ("dim", dim), ("shard_size", shard_size)):
                if index.get(key) != value:
                    raise InputError(f"{path} was written with {key}={index.get(key)}, this run has {value}; "
                                     f"use a new output folder.")
            if tower is not None and index.get("tower") is not None and not same_tower(index["tower"], tower):
                raise InputError(f"{path} holds features of another vision tower; use a new output folder.")
            # keep only shards whose file exists
            index["shards"] = [s for s in index["shards"] if (self.out / s["file"]).is_file()]
        else:
            index = {"format": FORMAT, "version": 1, "layer": layer, "dim": dim, "num_tokens": num_tokens,
                     "grid": list(grid) if grid else None, "dtype": "float16", "tower": tower,
                     "shard_size": shard_size, "count": 0, "shards": [], **(extra or {})}
        self.index = index

    def done(self, shard: int, sources: list[str]) -> bool:
        for s in self.index["shards"]:
            if s["shard"] == shard:
                if s["sources"] != sources:
                    raise InputError(f"Shard {shard} in {self.out} was extracted from other images "
                                     f"({s['sources'][:2]}… vs {sources[:2]}…); use a new output folder.")
                return True
        return False

    def write(self, shard: int, features: torch.Tensor, sources: list[str]) -> None:
        from safetensors.torch import save_file

        n_tok = int(features.shape[1])
        if self.index.get("num_tokens") is None:
            self.index["num_tokens"] = n_tok
        elif self.index["num_tokens"] != n_tok:
            raise InputError(f"Images of shard {shard} have {n_tok} tokens, earlier ones {self.index['num_tokens']}; "
                             f"all images of a feature set must share one token count.")
        name = f"shard-{shard:05d}.safetensors"
        tmp = self.out / (name + ".tmp")
        save_file({"features": features.to("cpu", torch.float16).contiguous()}, str(tmp))
        os.replace(tmp, self.out / name)
        self.index["shards"] = [s for s in self.index["shards"] if s["shard"] != shard]
        self.index["shards"].append({"shard": shard, "file": name, "count": int(features.shape[0]),
                                     "sources": sources})
        self.index["shards"].sort(key=lambda s: s["shard"])
        self.index["count"] = sum(s["count"] for s in self.index["shards"])
        _write_json(self.out / INDEX_NAME, self.index)


def write_feature_set(features: torch.Tensor, out_dir: str | Path, *, layer: int, grid: tuple[int, int] | None = None,
                      tower: dict | None = None, shard_size: int = 256) -> Path:
    """Store an in-memory (images, tokens, width) tensor in the extraction format (e.g. synthetic data)."""
    writer = FeatureWriter(out_dir, layer=layer, dim=int(features.shape[-1]), num_tokens=int(features.shape[1]),
                           grid=grid, tower=tower, shard_size=shard_size)
    for shard, start in enumerate(range(0, features.shape[0], shard_size)):
        chunk = features[start:start + shard_size]
        sources = [f"#{i}" for i in range(start, start + chunk.shape[0])]
        if not writer.done(shard, sources):
            writer.write(shard, chunk, sources)
    return Path(out_dir)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _source_name(item, i: int) -> str:
    return Path(item).name if isinstance(item, (str, os.PathLike)) else f"#{i}"


@torch.no_grad()
def extract_features(model, images: Iterable, layer: int | None, out_dir: str | Path, *, processor=None,
                     image_size: int | None = None, batch_size: int = 8, shard_size: int = 256,
                     progress: bool = True, total: int | None = None, squash: bool = False) -> Path:
    """Run ``model``'s vision tower over ``images`` (PIL images or paths, any iterable — a generator is
    fine) and store the tokens after block ``layer`` (None: :func:`default_layer`) under ``out_dir``.

    Resumable: shards already recorded in ``out_dir/index.json`` are skipped (their images are not
    processed; with a generator they are still drawn, in order). ``squash``: see :func:`preprocess`.
    Returns ``out_dir``.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0 or shard_size <= 0:
        raise InputError("batch_size and shard_size must be positive.")
    depth = tower_depth(model)
    layer = default_layer(depth) if layer is None else check_layer(model, layer)
    processor = processor if processor is not None else load_processor(model)
    processor = getattr(processor, "image_processor", processor)  # a full processor: its image part
    family = _family(model)
    param = next(tower_module(model).parameters())
    ident = tower_identity(model)
    extra = {"image_size": qwen_image_size(model, image_size) if _is_qwen(family) else model.config.vision_config.image_size,
             "model": str(getattr(model, "name_or_path", "") or ""), "squash": bool(squash)}
    writer = FeatureWriter(out_dir, layer=layer, dim=tower_width(model), tower=ident, shard_size=shard_size,
                           extra=extra)
    if total is None and hasattr(images, "__len__"):
        total = len(images)  # type: ignore[arg-type]
    bar = tqdm(total=total, unit="img", desc=f"extract layer {layer}", disable=not progress)
    offset = 0
    try:
        for shard, items in enumerate(_chunks(images, shard_size)):
            sources = [_source_name(item, offset + i) for i, item in enumerate(items)]
            offset += len(items)
            if writer.done(shard, sources):
                bar.update(len(items))
                continue
            parts = []
            for batch in _chunks(items, batch_size):
                inputs, grid = preprocess(model, processor, batch, image_size, squash)
                inputs = {k: (v.to(param.device, param.dtype) if k == "pixel_values" else v.to(param.device))
                          for k, v in inputs.items()}
                tokens = tower_tokens(model, inputs, layer)
                parts.append(torch.stack([t.to("cpu", torch.float16) for t in tokens]))
                if writer.index.get("grid") is None:
                    writer.index["grid"] = list(grid)
                bar.update(len(batch))
            writer.write(shard, torch.cat(parts), sources)
    finally:
        bar.close()
    return Path(out_dir)


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of images.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {folder}.")
    return files


def load_vlm(path: str | Path, device: str | None = None, dtype: str | None = None):
    """Load a local VLM checkpoint with transformers (never from a hub) and its image processor."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} is not a local model folder (vtprune never downloads).")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   None: None}[dtype]
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    model = AutoModelForImageTextToText.from_pretrained(str(path), config=config, **kwargs)
    model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    _family(model)  # clear error for unsupported classes
    return model, load_processor(model, path)


def extract_folder(model_path: str | Path, images: str | Path, out_dir: str | Path, *, layer: int | None = None,
                   batch_size: int = 8, device: str | None = None, image_size: int | None = None,
                   shard_size: int = 256, dtype: str | None = None, progress: bool = True,
                   squash: bool = False) -> Path:
    """``vtprune ocvtp extract``: a local model folder + an image folder → a feature set."""
    model, processor = load_vlm(model_path, device, dtype)
    files = image_files(images)
    return extract_features(model, files, layer, out_dir, processor=processor, image_size=image_size,
                            batch_size=batch_size, shard_size=shard_size, progress=progress, squash=squash)

