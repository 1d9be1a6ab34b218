"""Numpy drawing of the project's synthetic world: shapes, colours, textures.

Used twice: to pre-train the embedded trunk on still images
(:mod:`training.pretrain_trunk`) and to draw the synthetic video tasks
(:mod:`training.synthetic`). All randomness comes from the ``numpy.random.Generator``
passed in, so a seed fixes every pixel.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring")
# Named colours (RGB 0-255); the object colour is jittered around one of them.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 220, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 210, 220),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
TEXTURES = ("plain", "hstripes", "vstripes", "checker", "noise")


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """Boolean [size, size] mask of ``shape`` centred at (cx, cy) (pixels, sub-pixel allowed)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    r = radius
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        s = r * 0.85
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.1
    if shape == "cross":
        t = r * 0.35
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    if shape == "triangle":  # pointing up: symmetric under a horizontal flip
        top, bottom = cy - r, cy + 0.8 * r
        frac = np.clip((yy - top) / (bottom - top), 0.0, 1.0)
        return (yy >= top) & (yy <= bottom) & (np.abs(dx) <= frac * r)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def background(rng: np.random.Generator, size: int, texture: str) -> np.ndarray:
    """A dim textured background, uint8 [size, size, 3]."""
    base = rng.integers(10, 90, size=3).astype(np.float32)
    other = np.clip(base + rng.integers(25, 60, size=3) * rng.choice([-1, 1], size=3), 0, 110).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(4, 9))
    if texture == "plain":
        sel = np.zeros((size, size), bool)
    elif texture == "hstripes":
        sel = (yy // period) % 2 == 0
    elif texture == "vstripes":
        sel = (xx // period) % 2 == 0
    elif texture == "checker":
        sel = ((yy // period) + (xx // period)) % 2 == 0
    elif texture == "noise":
        sel = rng.random((size, size)) < 0.5
    else:
        raise ValueError(f"unknown texture {texture!r}; known: {TEXTURES}")
    img = np.where(sel[..., None], other, base)
    return img.astype(np.uint8)


def object_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    rgb = np.asarray(COLOURS[name], np.float32) + rng.normal(0, 12, size=3)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def paint(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[mask] = colour
    return out
