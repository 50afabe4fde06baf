"""Pictures: kept-token overlays on the input image, and accuracy-vs-tokens plots."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def _anyres(family: str) -> bool:
    from .models.families import get

    return get(family).anyres


def crop_boxes(family: str | None, image_size: tuple[int, int], grids: list[tuple[int, int]],
               crop_grid: tuple[int, int] | None = None) -> list[tuple[float, float, float, float]]:
    """Each crop's box on the original image as (x0, y0, x1, y1) pixels.

    LLaVA-1.5 / Qwen: one crop = the whole image. LLaVA-NeXT: crop 0 is the whole image (base view);
    crops 1.. tile the image row-major on ``crop_grid`` (rows, cols). Deviation: the AnyRes resize
    pads to the chosen resolution; we spread the tiles over the unpadded image, which is off by at
    most the padding (a few percent on typical aspect ratios)."""
    w, h = image_size
    boxes = [(0.0, 0.0, float(w), float(h))]
    if family is not None and _anyres(family) and len(grids) > 1:
        rows, cols = crop_grid or (1, len(grids) - 1)
        for k in range(len(grids) - 1):
            r, c = divmod(k, cols)
            boxes.append((c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows))
    return boxes


def overlay(image: Image.Image, kept_cells, grids: list[tuple[int, int]], boxes=None, family: str | None = None,
            draw_base: bool = True) -> Image.Image:
    """The image with dropped patches dimmed and kept ones outlined.

    kept_cells: (crop, row, col) triples (``handle.last.images[i].kept_cells``).
    grids: (rows, cols) per crop. For LLaVA-NeXT only the base crop is drawn unless ``draw_base`` is
    False, in which case the high-resolution crops are drawn on their tiles."""
    image = image.convert("RGB")
    boxes = boxes or crop_boxes(family, image.size, grids)
    dim = Image.new("RGB", image.size, (0, 0, 0))
    mask = Image.new("L", image.size, 150)  # dims everything; kept cells are cut out below
    draw_mask = ImageDraw.Draw(mask)
    outline = []
    crops = [0] if draw_base else list(range(1, len(grids)))
    for crop, row, col in kept_cells:
        if crop not in crops:
            continue
        x0, y0, x1, y1 = boxes[crop]
        rows, cols = grids[crop]
        cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
        cell = (x0 + col * cw, y0 + row * ch, x0 + (col + 1) * cw - 1, y0 + (row + 1) * ch - 1)
        draw_mask.rectangle(cell, fill=0)
        outline.append(cell)
    out = Image.composite(dim, image, mask)
    draw = ImageDraw.Draw(out)
    for cell in outline:
        draw.rectangle(cell, outline=(255, 220, 0))
    return out


def save_overlay(path: str | Path, image: Image.Image, kept_cells, grids, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay(image, kept_cells, grids, **kwargs).save(path)
    return path


def accuracy_plot(path: str | Path, results: dict[str, list[tuple[float, float]]], title: str,
                  full_accuracy: float | None = None,
                  xlabel: str = "visual tokens entering the LLM (mean)") -> Path:
    """results: method -> [(mean tokens, accuracy %)]. Writes a PNG; every method gets its own colour
    and marker (up to 20 methods), the legend sits beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    colours = plt.get_cmap("tab20").colors  # 10 hues, dark and light: methods 0-9 dark, 10-19 light
    markers = "osD^v<>phX*"
    for k, (method, points) in enumerate(sorted(results.items())):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[k % len(markers)],
                color=colours[(2 * k) % 20 + (k // 10) % 2], label=method)
    if full_accuracy is not None:
        ax.axhline(full_accuracy, color="grey", linestyle="--", label="no pruning")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
