"""Seeded synthetic scenes and templated questions for the demo VLM.

Everything is generated from integer seeds with numpy + PIL (no files, no downloads):

* :func:`make_scene` draws a :class:`Scene` description: a textured low-contrast background and
  1-8 non-overlapping objects (6 shapes x 6 colours, 2 to 5 patches of 14 px wide). Each object's
  centre is the middle of a patch (odd widths: the box lies on the patch grid; even widths: half a
  patch off it), with at least one patch between objects: a patch shows at most one object, always
  at the same offset for a given size, which is what let the tower learn to tell shapes apart within
  a 2-CPU training budget (with free placement it stayed near chance); and exactly one patch holds
  each centre, which counting reads (with even widths on the grid the centre fell on a patch corner,
  the tower's centre flags were ambiguous and counting stayed at 80 %). Every object carries a small
  dark square at its centre (:data:`MARKER`): without it the tower's centre flag, which needs an
  object's whole extent, recalled 84-86 % of the centres and flagged ~3 other patches per image;
  with it, a local cue, the exact set of centres in all 200 validation images.
* :func:`render` turns a scene into a 336x336 RGB ``PIL.Image`` (byte-identical for equal scenes).
* :func:`make_question` asks one templated question with a one-word answer; :func:`check_answer`
  re-derives the answer from the scene description by parsing the question text (an independent
  checker used by the tests).
* :func:`make_split` gives the fixed, deterministic train / val / test splits (disjoint seed ranges,
  question types balanced round-robin).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "diamond": "diamonds",
}
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 50, 195),
    "orange": (245, 135, 25),
}
COLOR_NAMES = tuple(COLORS)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
SIZES = (2, 3, 4, 5)  # object width in patches
SIZE_PROBS = (0.35, 0.3, 0.2, 0.15)
MAX_OBJECTS = 8
MIN_GAP = PATCH  # pixels between bounding boxes
#: every object carries a small dark square at its centre, inside the one patch that holds the centre
MARKER = 4  # side in pixels
MARKER_RGB = (30, 30, 30)
SPATIAL_MARGIN = 14  # centres must differ by at least one patch along the asked axis
#: spatial questions ask "is the A left or right of the B?" / "is the A above or below the B?"
AXES = {"left or right of": ("left", "right"), "above or below": ("above", "below")}

QTYPES = ("color", "shape", "count", "exist", "spatial")
ANSWER_WORDS = tuple(COLOR_NAMES) + SHAPES + NUMBERS + ("yes", "no", "left", "right", "above", "below")

SPLIT_BASES = {"train": 0, "val": 10_000_000, "test": 20_000_000}
SPLIT_SIZES = {"train": 10_000_000, "val": 10_000_000, "test": 10_000_000}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    rgb: tuple[int, int, int]
    size: int  # side of the bounding box in pixels
    cx: int
    cy: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive-exclusive pixel box."""
        h = self.size // 2
        return (self.cx - h, self.cy - h, self.cx - h + self.size, self.cy - h + self.size)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "center": (self.cx, self.cy), "bbox": self.bbox}


@dataclass(frozen=True)
class Scene:
    seed: int
    objects: tuple[SceneObject, ...]
    bg: dict = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "objects": [o.to_dict() for o in self.objects]}


@dataclass
class Example:
    """One question about one scene."""

    seed: int
    qtype: str
    question: str
    answer: str
    scene: Scene

    def image(self) -> Image.Image:
        return render(self.scene)


# --------------------------------------------------------------------------------------- scenes
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def make_scene(seed: int, attempt: int = 0, n_objects: int | None = None) -> Scene:
    """Draw a scene description from ``(seed, attempt)``; fully deterministic."""
    rng = _rng(seed, attempt, 7)
    n = int(n_objects) if n_objects is not None else int(rng.integers(1, MAX_OBJECTS + 1))
    objs: list[SceneObject] = []
    boxes: list[tuple[int, int, int, int]] = []
    tries = 0
    while len(objs) < n and tries < 2000:
        tries += 1
        cells = SIZES[0] if tries > 400 else int(rng.choice(SIZES, p=SIZE_PROBS))  # crowded: small ones
        size = cells * PATCH
        h = size // 2
        # the centre lies at the middle of a patch, so one patch holds it (even widths: half-patch offset)
        lo = cells // 2
        cx = int(rng.integers(lo, GRID - cells // 2)) * PATCH + PATCH // 2
        cy = int(rng.integers(lo, GRID - cells // 2)) * PATCH + PATCH // 2
        box = (cx - h, cy - h, cx - h + size, cy - h + size)
        if any(_boxes_close(box, b, MIN_GAP) for b in boxes):
            continue
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        base = np.array(COLORS[color])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-14, 15, size=3), 0, 255))
        objs.append(SceneObject(shape, color, rgb, size, cx, cy))
        boxes.append(box)
    bg = {
        "seed": int(rng.integers(0, 2**31 - 1)),
        "base": tuple(int(v) for v in rng.integers(95, 175, size=1).repeat(3) + rng.integers(-12, 13, size=3)),
    }
    return Scene(seed=int(seed), objects=tuple(objs), bg=bg)


def _boxes_close(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _background(bg: dict) -> np.ndarray:
    """Textured, low-contrast background: smooth noise + faint stripes + faint blobs + grain."""
    rng = np.random.default_rng(bg["seed"])
    S = IMAGE_SIZE
    base = np.array(bg["base"], dtype=np.float32)
    img = np.broadcast_to(base, (S, S, 3)).copy()
    # low-frequency noise (bilinear upsampling of a coarse grid), per channel
    coarse = rng.normal(0.0, 9.0, size=(7, 7, 3)).astype(np.float32)
    for c in range(3):
        ch = Image.fromarray(coarse[:, :, c]).resize((S, S), Image.BILINEAR)
        img[:, :, c] += np.asarray(ch, dtype=np.float32)
    # faint stripes at a random angle and period
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    ang = rng.uniform(0, np.pi)
    period = rng.uniform(10, 40)
    stripes = np.sin((xx * np.cos(ang) + yy * np.sin(ang)) * 2 * np.pi / period + rng.uniform(0, 6.3))
    img += (rng.uniform(3, 8) * stripes)[:, :, None]
    # faint blobs (desaturated, low contrast)
    over = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(over)
    for _ in range(int(rng.integers(3, 9))):
        r = int(rng.integers(15, 60))
        x, y = int(rng.integers(0, S)), int(rng.integers(0, S))
        d.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(60, 255)))
    sign = 1.0 if rng.random() < 0.5 else -1.0
    img += sign * (np.asarray(over, dtype=np.float32) / 255.0 * 12.0)[:, :, None]
    # grain
    img += rng.normal(0.0, 3.0, size=(S, S, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, size: int) -> list[tuple[float, float]] | None:
    r = size / 2.0
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r - 1), (cx - r, cy + r - 1)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + rad * np.sin(a) + r * 0.08))
        return pts
    if shape == "cross":
        t = r / 3.0
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    return None


def _draw(draw: ImageDraw.ImageDraw, o: SceneObject, fill) -> None:
    x0, y0, x1, y1 = o.bbox
    cx, cy = (x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0
    if o.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif o.shape == "square":
        m = round(o.size * 0.1)
        draw.rectangle((x0 + m, y0 + m, x1 - 1 - m, y1 - 1 - m), fill=fill)
    else:
        draw.polygon(_polygon(o.shape, cx, cy, o.size), fill=fill)


def render(scene: Scene) -> Image.Image:
    """Render a scene to a 336x336 RGB image (deterministic)."""
    img = Image.fromarray(_background(scene.bg), "RGB")
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(d, o, o.rgb)
        _draw_marker(d, o)
    return img


def _draw_marker(draw: ImageDraw.ImageDraw, o: SceneObject) -> None:
    """The centre marker: centred on the object's geometric centre ``(cx - 0.5, cy - 0.5)``."""
    x0, y0 = o.cx - MARKER // 2, o.cy - MARKER // 2
    draw.rectangle((x0, y0, x0 + MARKER - 1, y0 + MARKER - 1), fill=MARKER_RGB)


def object_mask(scene: Scene) -> np.ndarray:
    """(336, 336) int array: 0 background, k+1 for pixels of object k."""
    m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    d = ImageDraw.Draw(m)
    for k, o in enumerate(scene.objects):
        _draw(d, o, k + 1)
    return np.asarray(m, dtype=np.int64)


def patch_labels(scene: Scene, min_frac: float = 0.15) -> dict[str, np.ndarray]:
    """Per-patch (24x24, raster order flattened to 576) labels used as an auxiliary training target.

    ``color``/``shape``: 0 for background, else 1 + index of the object covering the largest share of
    the patch (when that share is >= ``min_frac``); ``center``: 1 on the patch holding an object's centre.
    """
    mask = object_mask(scene)
    n = len(scene.objects)
    blocks = mask.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, PATCH * PATCH)
    counts = np.stack([(blocks == k + 1).sum(1) for k in range(n)], 1) if n else np.zeros((GRID * GRID, 0))
    color = np.zeros(GRID * GRID, np.int64)
    shape = np.zeros(GRID * GRID, np.int64)
    center = np.zeros(GRID * GRID, np.int64)
    if n:
        best = counts.argmax(1)
        frac = counts.max(1) / float(PATCH * PATCH)
        on = frac >= min_frac
        for k, o in enumerate(scene.objects):
            sel = on & (best == k)
            color[sel] = 1 + COLOR_NAMES.index(o.color)
            shape[sel] = 1 + SHAPES.index(o.shape)
            x0, y0, x1, y1 = o.bbox
            center[min((y0 + y1) // 2 // PATCH, GRID - 1) * GRID + min((x0 + x1) // 2 // PATCH, GRID - 1)] = 1
    return {"color": color, "shape": shape, "center": center}


# ------------------------------------------------------------------------------------ questions
def _unique(objs: Iterable[SceneObject], key) -> list[SceneObject]:
    objs = list(objs)
    vals = [key(o) for o in objs]
    return [o for o, v in zip(objs, vals) if vals.count(v) == 1]


def _relation(a: SceneObject, axis: str, b: SceneObject) -> str | None:
    """Where ``a`` lies from ``b`` along ``axis`` (a key of :data:`AXES`): "left"/"right" or
    "above"/"below"; None when their centres are too close on that axis to call."""
    d = a.cx - b.cx if axis == "left or right of" else a.cy - b.cy
    if abs(d) < SPATIAL_MARGIN:
        return None
    before, after = AXES[axis]
    return after if d > 0 else before


def _ask(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    objs = list(scene.objects)
    if qtype == "color":
        cand = _unique(objs, lambda o: o.shape)
        if not cand:
            return None
        o = cand[int(rng.integers(len(cand)))]
        return f"what color is the {o.shape}?", o.color
    if qtype == "shape":
        cand = _unique(objs, lambda o: o.color)
        if not cand:
            return None
        o = cand[int(rng.integers(len(cand)))]
        return f"what shape is the {o.color} object?", o.shape
    if qtype == "count":
        u = rng.random()
        if u < 0.5:
            return "how many objects are there?", NUMBERS[len(objs)]
        if u < 0.75:
            c = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            return f"how many {c} objects are there?", NUMBERS[sum(o.color == c for o in objs)]
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"how many {PLURALS[s]} are there?", NUMBERS[sum(o.shape == s for o in objs)]
    if qtype == "exist":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            c, s = sorted(present)[int(rng.integers(len(present)))]
        else:
            colors = sorted({o.color for o in objs})
            shapes = sorted({o.shape for o in objs})
            hard = [(c, s) for c in colors for s in shapes if (c, s) not in present]
            if hard and rng.random() < 0.6:  # colour and shape both present, but not together
                c, s = hard[int(rng.integers(len(hard)))]
            else:
                absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
                c, s = absent[int(rng.integers(len(absent)))]
        return f"is there a {c} {s}?", "yes" if (c, s) in present else "no"
    if qtype == "spatial":
        cand = _unique(objs, lambda o: (o.color, o.shape))
        opts = [(a, axis, b, _relation(a, axis, b)) for a in cand for b in cand if a is not b for axis in AXES]
        opts = [o for o in opts if o[3] is not None]  # (a, b) and (b, a) both count: answers stay balanced
        if not opts:
            return None
        a, axis, b, where = opts[int(rng.integers(len(opts)))]
        return f"is the {a.name} {axis} the {b.name}?", where
    raise ValueError(f"unknown question type {qtype!r}")


def make_question(seed: int, qtype: str | None = None, max_attempts: int = 50) -> Example:
    """One example from ``seed``: a scene and a question of ``qtype`` (random type if None).

    When the scene cannot support the type (e.g. no unique shape for a colour question), a fresh
    scene is drawn from ``(seed, attempt)``; everything stays deterministic in ``seed``.
    """
    for attempt in range(max_attempts):
        rng = _rng(seed, attempt, 11)
        qt = qtype if qtype is not None else QTYPES[int(rng.integers(len(QTYPES)))]
        scene = make_scene(seed, attempt)
        qa = _ask(scene, qt, rng)
        if qa is not None:
            return Example(seed=int(seed), qtype=qt, question=qa[0], answer=qa[1], scene=scene)
    raise RuntimeError(f"could not ask a {qtype} question for seed {seed}")


def scene_questions(scene: Scene, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """Up to ``n`` (qtype, question, answer) triples about one scene (types round-robin, deduplicated)."""
    out, seen = [], set()
    start = int(rng.integers(len(QTYPES)))
    for k in range(n * 3):
        qt = QTYPES[(start + k) % len(QTYPES)]
        qa = _ask(scene, qt, rng)
        if qa is None or qa[0] in seen:
            continue
        seen.add(qa[0])
        out.append((qt, qa[0], qa[1]))
        if len(out) == n:
            break
    return out


def make_split(split: str, n: int, start: int = 0) -> list[Example]:
    """Deterministic examples ``start .. start+n-1`` of a split; types are balanced round-robin."""
    if split not in SPLIT_BASES:
        raise ValueError(f"split must be one of {sorted(SPLIT_BASES)}, got {split!r}")
    if start + n > SPLIT_SIZES[split]:
        raise ValueError(f"split {split!r} holds {SPLIT_SIZES[split]} examples")
    base = SPLIT_BASES[split]
    return [make_question(base + i, QTYPES[i % len(QTYPES)]) for i in range(start, start + n)]


# -------------------------------------------------------------------------------------- checker
_WORD = r"([a-z]+)"


def check_answer(scene: Scene, question: str) -> str:
    """Recompute the answer to a templated question from the scene description alone.

    Raises ``ValueError`` for a question that is not a template or is ambiguous for the scene.
    """
    q = question.strip().lower()
    objs = list(scene.objects)
    m = re.fullmatch(rf"what color is the {_WORD}\?", q)
    if m:
        hits = [o for o in objs if o.shape == m.group(1)]
        if len(hits) != 1:
            raise ValueError(f"ambiguous: {len(hits)} objects match {question!r}")
        return hits[0].color
    m = re.fullmatch(rf"what shape is the {_WORD} object\?", q)
    if m:
        hits = [o for o in objs if o.color == m.group(1)]
        if len(hits) != 1:
            raise ValueError(f"ambiguous: {len(hits)} objects match {question!r}")
        return hits[0].shape
    if q == "how many objects are there?":
        return NUMBERS[len(objs)]
    m = re.fullmatch(rf"how many {_WORD} objects are there\?", q)
    if m:
        return NUMBERS[sum(o.color == m.group(1) for o in objs)]
    m = re.fullmatch(rf"how many {_WORD} are there\?", q)
    if m:
        singular = {v: k for k, v in PLURALS.items()}[m.group(1)]
        return NUMBERS[sum(o.shape == singular for o in objs)]
    m = re.fullmatch(rf"is there a {_WORD} {_WORD}\?", q)
    if m:
        return "yes" if any(o.color == m.group(1) and o.shape == m.group(2) for o in objs) else "no"
    m = re.fullmatch(rf"is the {_WORD} {_WORD} (left or right of|above or below) the {_WORD} {_WORD}\?", q)
    if m:
        def find(c, s):
            hits = [o for o in objs if o.color == c and o.shape == s]
            if len(hits) != 1:
                raise ValueError(f"ambiguous referent {c} {s}")
            return hits[0]
        where = _relation(find(m.group(1), m.group(2)), m.group(3), find(m.group(4), m.group(5)))
        if where is None:
            raise ValueError("relation too close to call")
        return where
    raise ValueError(f"not a template question: {question!r}")


def vocabulary() -> list[str]:
    """Every word the templates and answers can produce (lower case, punctuation split off)."""
    words = set(ANSWER_WORDS) | set(PLURALS.values())
    for t in ("what color is the", "what shape is the object", "how many objects are there",
              "is there a", "is the left or right of above or below", "user assistant"):
        words.update(t.split())
    words.update(["?", ":", ",", "."])
    return sorted(words)
