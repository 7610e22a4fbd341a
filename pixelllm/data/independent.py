"""An independent renderer of the synthetic vocabulary, used only for evaluation.

It draws the same shapes, colors, sizes and positions as `synthetic.py` with different code, so that a
model trained on `synthetic.py` scenes can be checked for generalization beyond its own generator:

- drawing: numpy signed distance fields with analytic anti-aliasing (no PIL drawing, no supersampling);
- geometry: rounded squares, isosceles triangles, stars and diamonds with random proportions;
- sizes: small 12-19% and large 29-44% of the shorter canvas side (synthetic: 10-17% and 27-40%);
- colors: a different RGB palette with per-channel jitter (synthetic jitters hue/saturation/value);
- backgrounds: stripes, checkerboard, blotches or a radial vignette; inner strokes and drop shadows;
  sensor noise and stronger JPEG compression.

The text, position, referring and narrative rules are shared with `synthetic.py` (`assemble_scene`), so
the output is the same `Scene` contract. Coordinates are as in `synthetic.py`.
"""

from __future__ import annotations

import math

import numpy as np

from pixelllm.data.synthetic import Scene, lay_out_scene, position_margin

SIZE_RANGES = {"small": (0.12, 0.19), "large": (0.29, 0.44)}
PALETTE = {
    "red": (228, 26, 40),
    "green": (50, 175, 70),
    "blue": (20, 90, 215),
    "yellow": (250, 222, 30),
    "purple": (135, 40, 175),
    "orange": (247, 128, 20),
}


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance (px, negative inside) from points to a closed polygon given as (N, 2) vertices."""
    dist = np.full(px.shape, np.inf)
    inside = np.zeros(px.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(verts, np.roll(verts, -1, axis=0), strict=True):
        ex, ey = bx - ax, by - ay
        t = np.clip(((px - ax) * ex + (py - ay) * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(px - ax - t * ex, py - ay - t * ey))
        crosses = (ay > py) != (by > py)
        x_at = ax + (py - ay) * ex / np.where(ey == 0, 1.0, ey)
        inside ^= crosses & (px < x_at)
    return np.where(inside, -dist, dist)


def _shape_sdf(
    shape: str, px: np.ndarray, py: np.ndarray, s: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    """Signed distance to a shape of extent ~s centered at the origin of (px, py), rotated by `angle`."""
    c, sn = math.cos(angle), math.sin(angle)
    u, v = px * c + py * sn, -px * sn + py * c  # rotate the sample points, not the shape
    if shape == "circle":
        return np.hypot(u, v) - s / 2
    if shape == "square":
        half, r = 0.42 * s, rng.uniform(0.0, 0.1) * s
        qx, qy = np.abs(u) - (half - r), np.abs(v) - (half - r)
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0) - r
    if shape == "diamond":
        w = rng.uniform(0.3, 0.4) * s
        verts = [(0, -s / 2), (w, 0), (0, s / 2), (-w, 0)]
    elif shape == "triangle":
        half_w, height = rng.uniform(0.45, 0.52) * s, rng.uniform(0.8, 0.95) * s
        verts = [(0, -0.55 * height), (half_w, 0.45 * height), (-half_w, 0.45 * height)]
    else:  # star
        inner = rng.uniform(0.38, 0.5) * 0.5 * s
        radii = [s / 2 if k % 2 == 0 else inner for k in range(10)]
        verts = [(r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5)) for k, r in enumerate(radii)]
    return _polygon_sdf(u, v, np.asarray(verts, dtype=np.float64))


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation RGB color (0-255 floats) for backgrounds."""
    return np.clip(rng.uniform(50, 240) * (1 + rng.uniform(-0.15, 0.15, 3)), 0, 255)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """HxWx3 float background: stripes, checkerboard, blotches or a radial vignette."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a, b = _muted(rng), _muted(rng)
    kind = ("stripes", "checkerboard", "blotches", "vignette")[int(rng.integers(4))]
    if kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(8, 40)
        t = 0.5 + 0.5 * np.tanh(4 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period))
    elif kind == "checkerboard":
        cell, angle = rng.uniform(10, 48), rng.uniform(0, math.pi / 2)
        u, v = xx * math.cos(angle) + yy * math.sin(angle), -xx * math.sin(angle) + yy * math.cos(angle)
        t = ((np.floor(u / cell) + np.floor(v / cell)) % 2) * rng.uniform(0.3, 1.0)
    elif kind == "blotches":
        t = np.zeros((h, w))
        for _ in range(int(rng.integers(4, 12))):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
            t += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        t = np.clip(t, 0, 1)
    else:
        cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        t = np.clip(np.hypot(xx - cx, yy - cy) / max(w, h), 0, 1)
    return a * (1 - t[..., None]) + b * t[..., None]


def _place(rng: np.random.Generator, s: float, w: int, h: int, placed: list) -> tuple[float, float] | None:
    """A center for an object of extent s: inside the canvas, clear of others, unambiguous position."""
    r = 0.62 * s
    for _ in range(100):
        cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        if position_margin(cx, cy, w, h) > 0.05 and all(
            math.hypot(cx - x, cy - y) > 0.95 * (r + q) for x, y, q in placed
        ):
            placed.append((cx, cy, r))
            return cx, cy
    return None


def _render(rng: np.random.Generator, w: int, h: int, attrs: list[tuple[str, str, str]]) -> tuple[np.ndarray, list]:
    """Draw the objects that fit: (HxWx3 uint8 image, [(shape, color, size, mask)])."""
    img = _background(rng, h, w)
    drawn, placed = [], []
    for shape, color, size in attrs:
        s = rng.uniform(*SIZE_RANGES[size]) * min(w, h)
        center = _place(rng, s, w, h, placed)
        if center is None:
            continue
        cx, cy = center
        x0, y0 = max(int(cx - 0.7 * s) - 6, 0), max(int(cy - 0.7 * s) - 6, 0)
        x1, y1 = min(int(cx + 0.7 * s) + 8, w), min(int(cy + 0.7 * s) + 8, h)
        yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5  # pixel centers
        angle = math.radians(rng.uniform(-10, 10))
        sdf = _shape_sdf(shape, xx - cx, yy - cy, s, angle, rng)
        alpha = np.clip(0.5 - sdf, 0, 1)[..., None]
        patch = img[y0:y1, x0:x1]
        if rng.random() < 0.3:  # drop shadow, offset down-right
            dx, dy = (int(v) for v in rng.integers(2, 5, size=2))
            shadow = np.zeros_like(alpha)
            shadow[dy:, dx:] = alpha[:-dy, :-dx] * rng.uniform(0.3, 0.5)
            patch = patch * (1 - shadow)
        fill = np.clip(np.asarray(PALETTE[color], dtype=np.float64) + rng.uniform(-18, 18, 3), 0, 255)
        patch = patch * (1 - alpha) + fill * alpha
        if rng.random() < 0.3:  # inner stroke in a darker tint of the fill
            width = max(1.0, s * rng.uniform(0.03, 0.06))
            stroke = np.clip(0.5 - (np.abs(sdf + width / 2) - width / 2), 0, 1)[..., None] * alpha
            patch = patch * (1 - stroke) + fill * rng.uniform(0.3, 0.6) * stroke
        img[y0:y1, x0:x1] = patch
        mask = np.zeros((h, w), dtype=bool)
        mask[y0:y1, x0:x1] = sdf < 0
        drawn.append((shape, color, size, mask))
    img = img + rng.normal(0, rng.uniform(0, 5), img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8), drawn


def render_independent_scene(seed: int) -> Scene:
    """Render the independent scene for `seed`; same `Scene` contract as `generate_scene`.

    The generator is PCG64 seeded with (seed, 1), so it shares no draws with `generate_scene(seed)`.
    """
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    return lay_out_scene(rng, _render, (55, 91), seed, f"independent-{seed}")
