"""Synthetic grounded narratives: simple scenes of colored shapes, with captions, masks and mouse traces.

`generate_scene(seed)` renders 1-4 objects (shapes x colors x sizes) on a textured canvas of 160-640 px
per side and describes them in a fixed vocabulary::

    caption    "a large red circle on the left and a small blue square at the bottom."
    region     "a small blue square."
    referring  "the red circle", "the large blue square", "the green star on the left"

plus a Localized Narratives record (`narratives.py` format) whose synthetic mouse trace circles inside
each object while its words are "spoken". Everything is a pure function of the seed.

Drawing here uses PIL `ImageDraw` polygons at 4x supersampling; `independent.py` draws the same vocabulary
with different code for evaluation. The text, position and narrative rules below are the shared contract.

Coordinates: boxes are (x0, y0, x1, y1) in absolute pixels, x right, y down, where pixel (row i, col j)
covers [j, j+1) x [i, i+1), so a box is tight when it equals the mask's pixel extent. Traces in the
narrative are normalized to [0, 1] by the canvas width and height.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pixelllm.data.rle import encode_mask

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")
VOCABULARY = frozenset({"a", "and", "the", *SHAPES, *COLORS, *SIZES, *" ".join(POSITIONS).split()})

CANVAS_RANGE = (160, 640)  # px per side, inclusive
SIZE_RANGES = {"small": (0.10, 0.17), "large": (0.27, 0.40)}  # object extent / shorter canvas side
HUES = {"red": 0.0, "orange": 30.0, "yellow": 55.0, "green": 125.0, "blue": 220.0, "purple": 280.0}
SUPERSAMPLE = 4
MIN_VISIBLE = 0.8  # an object keeps at least this fraction of its own pixels after later objects
TRACE_HZ = 20.0


@dataclass
class SceneObject:
    """One object: its words, its tight box (x0, y0, x1, y1) in absolute px and its visible HxW mask."""

    shape: str
    color: str
    size: str
    position: str
    box: tuple[float, float, float, float]
    mask: np.ndarray
    referring: str


@dataclass
class Scene:
    """A rendered scene: HxWx3 uint8 image, its objects in caption order, caption and LN record."""

    image: np.ndarray
    objects: list[SceneObject]
    caption: str
    narrative: dict
    seed: int

    @property
    def image_id(self) -> str:
        return self.narrative["image_id"]


# ---- text and position rules (shared with independent.py) ----


def position_phrase(cx: float, cy: float, width: float, height: float) -> str:
    """The position phrase of a point (an object's box center) on a width x height canvas.

    "in the middle" when the point is in the central third on both axes; otherwise the side of the axis
    along which it is farther from the center ("on the left" means x < width / 3, and so on).
    """
    dx, dy = cx / width - 0.5, cy / height - 0.5
    if max(abs(dx), abs(dy)) < 1 / 6:
        return "in the middle"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def position_margin(cx: float, cy: float, width: float, height: float) -> float:
    """How far (normalized units) the point is from changing `position_phrase`; placement keeps it >0.03."""
    dx, dy = abs(cx / width - 0.5), abs(cy / height - 0.5)
    m = max(dx, dy)
    return abs(m - 1 / 6) if m < 1 / 6 else min(m - 1 / 6, abs(dx - dy))


def object_phrase(obj: SceneObject) -> str:
    return f"a {obj.size} {obj.color} {obj.shape} {obj.position}"


def region_caption(obj: SceneObject) -> str:
    """Caption of one object's region: "a small green star."."""
    return f"a {obj.size} {obj.color} {obj.shape}."


def scene_caption(objects: list[SceneObject]) -> str:
    """Objects joined with ", " and a final " and ": "a ... on the left and a ... at the bottom."."""
    phrases = [object_phrase(o) for o in objects]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text + "."


REFERRING_KEYS = (("color",), ("size", "color"), ("color", "position"), ("size", "color", "position"))


def referring_expression(obj: SceneObject, objects: list[SceneObject]) -> str | None:
    """The shortest expression naming `obj` alone among `objects`, or None if none is unique.

    Tried in order: "the red circle", "the large red circle", "the red circle on the left",
    "the large red circle on the left".
    """
    for keys in REFERRING_KEYS:
        matches = [o for o in objects if o.shape == obj.shape and all(getattr(o, k) == getattr(obj, k) for k in keys)]
        if len(matches) == 1:
            words = ["the", *(getattr(obj, k) for k in ("size", "color") if k in keys), obj.shape]
            if "position" in keys:
                words.append(obj.position)
            return " ".join(words)
    return None


# ---- narrative ----


def build_narrative(
    image_id: str, objects: list[SceneObject], width: int, height: int, rng: np.random.Generator
) -> dict:
    """A Localized Narratives record for the scene caption, with one utterance per word.

    Words take 0.3-0.5 s each with a short pause before each object's phrase. While an object's words are
    spoken the trace (20 Hz) circles in a jittered loop around the object's mask centroid, inside its box;
    between objects it moves in a straight line from one loop to the next.
    """
    words: list[tuple[str, int | None]] = []
    for i, obj in enumerate(objects):
        if i and i == len(objects) - 1:
            words.append(("and", None))
        words += [(w, i) for w in object_phrase(obj).split()]

    timed, spans, t = [], {}, rng.uniform(0.3, 0.8)
    for k, (word, owner) in enumerate(words):
        if owner is not None and (k == 0 or words[k - 1][1] != owner):
            t += rng.uniform(0.15, 0.35)
        end = t + rng.uniform(0.3, 0.5)
        timed.append({"utterance": word, "start_time": round(t, 3), "end_time": round(end, 3)})
        if owner is not None:
            spans[owner] = (spans.get(owner, (t, end))[0], end)
        t = end + rng.uniform(0.0, 0.08)

    loops = [_trace_loop(obj, spans[i], rng) for i, obj in enumerate(objects)]
    times = np.arange(0.0, t + 0.3, 1 / TRACE_HZ)
    times = times + rng.uniform(0.0, 0.1 / TRACE_HZ, len(times))  # sampling jitter, still increasing
    xy = np.empty((len(times), 2))
    for k, tk in enumerate(times):
        nxt = next((i for i in range(len(objects)) if tk < spans[i][0]), None)
        if nxt is None:
            xy[k] = loops[-1](tk)
        elif nxt == 0:
            xy[k] = loops[0](tk)
        elif tk <= spans[nxt - 1][1]:
            xy[k] = loops[nxt - 1](tk)
        else:  # moving from object nxt-1 to object nxt
            t0, t1 = spans[nxt - 1][1], spans[nxt][0]
            a = (tk - t0) / (t1 - t0)
            xy[k] = (1 - a) * loops[nxt - 1](t0) + a * loops[nxt](t1)
    trace = [
        {"x": round(float(x) / width, 4), "y": round(float(y) / height, 4), "t": round(float(tk), 3)}
        for (x, y), tk in zip(xy, times, strict=True)
    ]
    return {
        "dataset_id": "pixelllm-synthetic",
        "image_id": image_id,
        "annotator_id": 0,
        "caption": scene_caption(objects),
        "timed_caption": timed,
        "traces": [trace],
        "voice_recording": "",
    }


def _trace_loop(obj: SceneObject, span: tuple[float, float], rng: np.random.Generator) -> Callable[[float], np.ndarray]:
    """Position (x, y) in px at time t of a jittered elliptic loop inside the object's box."""
    ys, xs = np.nonzero(obj.mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    x0, y0, x1, y1 = obj.box
    rx, ry = rng.uniform(0.1, 0.25) * (x1 - x0), rng.uniform(0.1, 0.25) * (y1 - y0)
    phase, period = rng.uniform(0, 2 * math.pi), rng.uniform(0.8, 1.6)
    wobble = rng.uniform(0, 2 * math.pi, 2)
    jitter = 0.04 * min(x1 - x0, y1 - y0)

    def at(t: float) -> np.ndarray:
        a = phase + 2 * math.pi * (t - span[0]) / period
        x = cx + rx * math.cos(a) + jitter * math.sin(7.3 * t + wobble[0])
        y = cy + ry * math.sin(a) + jitter * math.sin(5.9 * t + wobble[1])
        return np.array([min(max(x, x0 + 0.5), x1 - 0.5), min(max(y, y0 + 0.5), y1 - 0.5)])

    return at


# ---- scene assembly (shared with independent.py) ----


def assemble_scene(
    image: np.ndarray,
    drawn: list[tuple[str, str, str, np.ndarray]],
    seed: int,
    image_id: str,
    rng: np.random.Generator,
) -> Scene | None:
    """Build the Scene from the final image and the objects in drawing order.

    `drawn` holds (shape, color, size, full_mask) per object, full_mask being the object's own HxW bool
    pixels before later objects were drawn over it. Returns None when an object is mostly hidden or some
    object has no unique referring expression (the caller then re-renders).
    """
    h, w = image.shape[:2]
    covered = np.zeros((h, w), dtype=bool)
    objects: list[SceneObject] = []
    for shape, color, size, full in reversed(drawn):
        visible = full & ~covered
        covered |= full
        if visible.sum() < MIN_VISIBLE * full.sum():
            return None
        ys, xs = np.nonzero(visible)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        position = position_phrase((box[0] + box[2]) / 2, (box[1] + box[3]) / 2, w, h)
        objects.insert(0, SceneObject(shape, color, size, position, box, visible, referring=""))
    for obj in objects:
        referring = referring_expression(obj, objects)
        if referring is None:
            return None
        obj.referring = referring
    narrative = build_narrative(image_id, objects, w, h, rng)
    return Scene(image=image, objects=objects, caption=narrative["caption"], narrative=narrative, seed=seed)


def sample_attributes(rng: np.random.Generator, allow_repeats: bool) -> list[tuple[str, str, str]]:
    """1-4 (shape, color, size) triples; with `allow_repeats` some repeat an earlier shape and color."""
    attrs = []
    for i in range(int(rng.integers(1, 5))):
        if allow_repeats and i and rng.random() < 0.3:
            shape, color, _ = attrs[int(rng.integers(i))]
        else:
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]
        attrs.append((shape, color, SIZES[int(rng.integers(len(SIZES)))]))
    return attrs


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode to JPEG in memory at `quality` and decode: the HxWx3 uint8 image a JPEG file would give."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


# ---- drawing (this renderer only) ----


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _object_rgb(color: str, rng: np.random.Generator) -> np.ndarray:
    """A jittered but unambiguous RGB (0-255 floats) for a color name."""
    hue = (HUES[color] + rng.uniform(-4, 4)) / 360.0
    value = rng.uniform(0.9, 1.0) if color in ("yellow", "orange") else rng.uniform(0.78, 1.0)
    return _hsv(hue, rng.uniform(0.75, 1.0), value)


def _background_rgb(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.0, 0.2), rng.uniform(0.25, 0.97))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float background: plain, gradient, noise or texture, in desaturated colors."""
    kind = ("plain", "gradient", "noise", "texture")[int(rng.integers(4))]
    base = _background_rgb(rng)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
        img = img * (1 - ramp[..., None]) + _background_rgb(rng) * ramp[..., None]
    elif kind == "noise":
        img = img + rng.normal(0, rng.uniform(5, 18), (h, w, 1)).astype(np.float32)
    elif kind == "texture":
        for _ in range(int(rng.integers(2, 5))):
            angle, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.4)
            wave = np.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
            img = img + rng.uniform(4, 14) * wave[..., None]
        img = img + rng.normal(0, 3, (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 255)


def _shape_outline(shape: str, cx: float, cy: float, s: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices (px) of a shape of extent ~s centered at (cx, cy), rotated by `angle` radians.

    A circle is returned as its two bounding-box corners.
    """
    if shape == "circle":
        return [(cx - s / 2, cy - s / 2), (cx + s / 2, cy + s / 2)]
    if shape == "square":
        pts = [(-0.41 * s, -0.41 * s), (0.41 * s, -0.41 * s), (0.41 * s, 0.41 * s), (-0.41 * s, 0.41 * s)]
    elif shape == "diamond":
        pts = [(0, -0.5 * s), (0.36 * s, 0), (0, 0.5 * s), (-0.36 * s, 0)]
    elif shape == "triangle":
        r = 0.55 * s
        pts = [(r * math.sin(a), -r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    else:  # star
        radii = [0.5 * s if k % 2 == 0 else 0.21 * s for k in range(10)]
        pts = [(r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5)) for k, r in enumerate(radii)]
    c, sn = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * sn, cy + x * sn + y * c) for x, y in pts]


def _coverage(
    shape: str, pts: list, origin: tuple[int, int], size: tuple[int, int], outline: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fill and outline coverage in [0, 1] over a patch (size = (w, h) at `origin` px), by supersampling."""
    ox, oy = origin
    xy = [((x - ox) * SUPERSAMPLE, (y - oy) * SUPERSAMPLE) for x, y in pts]

    def raster(**kwargs) -> np.ndarray:
        layer = Image.new("L", (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE), 0)
        draw = ImageDraw.Draw(layer)
        (draw.ellipse if shape == "circle" else draw.polygon)(xy, **kwargs)
        return np.asarray(layer.resize(size, Image.Resampling.BOX), dtype=np.float32) / 255.0

    fill = raster(fill=255)
    edge = raster(outline=255, width=outline * SUPERSAMPLE) if outline else np.zeros_like(fill)
    return fill, edge


def _place(
    rng: np.random.Generator,
    shape: str,
    s: float,
    angle: float,
    w: int,
    h: int,
    placed: list[tuple[float, float, float]],
) -> list | None:
    """Vertices for the shape at a free spot whose position phrase is unambiguous, or None."""
    r = 0.55 * s
    for _ in range(60):
        cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
        if any(math.hypot(cx - px, cy - py) < 0.9 * (r + pr) for px, py, pr in placed):
            continue
        pts = _shape_outline(shape, cx, cy, s, angle)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if position_margin((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, w, h) < 0.03:
            continue
        placed.append((cx, cy, r))
        return pts
    return None


def _render(rng: np.random.Generator, w: int, h: int, attrs: list[tuple[str, str, str]]) -> tuple[np.ndarray, list]:
    """Draw the objects that fit on a fresh background: (HxWx3 uint8 image, [(shape, color, size, mask)])."""
    img = _background(rng, h, w)
    drawn, placed = [], []
    short = min(w, h)
    outline_style = int(rng.integers(3))  # 0 none, 1 dark, 2 darker shade of the fill
    for shape, color, size in attrs:
        s = rng.uniform(*SIZE_RANGES[size]) * short
        max_turn = {"circle": 0.0, "square": 12.0, "diamond": 10.0}.get(shape, 15.0)
        pts = _place(rng, shape, s, math.radians(rng.uniform(-max_turn, max_turn)), w, h, placed)
        if pts is None:
            continue
        fill = _object_rgb(color, rng)
        outline = 0 if outline_style == 0 else max(1, round(s * rng.uniform(0.03, 0.06)))
        edge = _hsv(0, 0, rng.uniform(0.0, 0.2)) if outline_style == 1 else fill * rng.uniform(0.45, 0.65)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0 = max(int(min(xs)) - 2, 0), max(int(min(ys)) - 2, 0)
        x1, y1 = min(int(max(xs)) + 3, w), min(int(max(ys)) + 3, h)
        a_fill, a_edge = _coverage(shape, pts, (x0, y0), (x1 - x0, y1 - y0), outline)
        patch = img[y0:y1, x0:x1]
        patch = patch * (1 - a_fill[..., None]) + fill * a_fill[..., None]
        img[y0:y1, x0:x1] = patch * (1 - a_edge[..., None]) + edge * a_edge[..., None]
        mask = np.zeros((h, w), dtype=bool)
        mask[y0:y1, x0:x1] = np.maximum(a_fill, a_edge) >= 0.5
        drawn.append((shape, color, size, mask))
    return np.clip(img, 0, 255).round().astype(np.uint8), drawn


def lay_out_scene(
    rng: np.random.Generator,
    render: Callable[[np.random.Generator, int, int, list[tuple[str, str, str]]], tuple[np.ndarray, list]],
    jpeg_quality: tuple[int, int],
    seed: int,
    image_id: str,
) -> Scene:
    """Draw attributes and render with `render` until the scene's referring expressions are unique."""
    w, h = (int(v) for v in rng.integers(CANVAS_RANGE[0], CANVAS_RANGE[1] + 1, size=2))
    for attempt in range(100):
        attrs = sample_attributes(rng, allow_repeats=attempt < 10)
        image, drawn = render(rng, w, h, attrs)
        if not drawn:
            continue
        image = jpeg_roundtrip(image, int(rng.integers(*jpeg_quality)))
        scene = assemble_scene(image, drawn, seed, image_id, rng)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not lay out scene {image_id}")


def generate_scene(seed: int) -> Scene:
    """Render the scene for `seed` (numpy PCG64): same seed, same pixels and annotations."""
    return lay_out_scene(np.random.Generator(np.random.PCG64(seed)), _render, (70, 96), seed, f"synthetic-{seed}")


# ---- dataset files ----


def scene_seed(seed: int, index: int) -> int:
    """The seed of scene `index` of a dataset written with `seed` (63-bit, from numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def scene_annotation(scene: Scene, file_name: str) -> dict:
    """The annotations.jsonl record of a scene (boxes in absolute px, masks as COCO RLE)."""
    h, w = scene.image.shape[:2]
    return {
        "image_id": scene.image_id,
        "file_name": file_name,
        "width": w,
        "height": h,
        "seed": scene.seed,
        "caption": scene.caption,
        "objects": [
            {
                "shape": o.shape,
                "color": o.color,
                "size": o.size,
                "position": o.position,
                "box": list(o.box),
                "referring": o.referring,
                "region_caption": region_caption(o),
                "mask": encode_mask(o.mask),
            }
            for o in scene.objects
        ],
    }


def _renderer(name: str) -> Callable[[int], Scene]:
    if name == "synthetic":
        return generate_scene
    if name == "independent":
        from pixelllm.data.independent import render_independent_scene  # imports this module

        return render_independent_scene
    raise ValueError(f"unknown renderer {name!r}; expected 'synthetic' or 'independent'")


def write_dataset(out_dir: str | Path, n: int, seed: int, renderer: str = "synthetic", overwrite: bool = False) -> Path:
    """Write `n` scenes to `out_dir`: images/<image_id>.jpg, narratives.jsonl, annotations.jsonl.

    Scene i is rendered from `scene_seed(seed, i)` by `renderer` ("synthetic" or "independent"). A folder that holds
    anything is refused (`FileExistsError`) unless `overwrite`. The JSONL files are written under temporary names and
    renamed when every scene is written, so a run cut off leaves none half written under their names.
    """
    render = _renderer(renderer)
    out = Path(out_dir)
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} is not empty: give an empty or new folder, or pass --overwrite (overwrite=True) to write the "
            "scenes over what is there"
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = ("narratives.jsonl", "annotations.jsonl")
    partial = {name: out / f".{name}.partial" for name in names}
    try:
        with partial[names[0]].open("w") as narratives, partial[names[1]].open("w") as annotations:
            for i in tqdm(range(n), desc=f"{renderer} scenes", unit="scene"):
                scene = render(scene_seed(seed, i))
                file_name = f"images/{scene.image_id}.jpg"
                Image.fromarray(scene.image).save(out / file_name, quality=95)
                narratives.write(json.dumps(scene.narrative) + "\n")
                annotations.write(json.dumps(scene_annotation(scene, file_name)) + "\n")
        for name, path in partial.items():
            os.replace(path, out / name)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    logger.info("wrote %d %s scenes to %s", n, renderer, out)
    return out
