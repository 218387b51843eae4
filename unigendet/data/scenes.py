"""Procedural scenes: the generation domain of the embedded data set, with exact prompt-following checks.

A scene is one flat-coloured shape on a plain background. Its caption names four attributes, each read back from
the pixels by :func:`read_scene` without any learned model:

* ``colour`` of the shape: red, green, blue, yellow, magenta or cyan;
* ``shape``: circle, square or triangle (told apart by how much of its bounding box the shape fills:
  1 for a square, pi/4 for a circle, 1/2 for a triangle);
* ``position``: the quadrant of the shape's centre (top left, top right, bottom left, bottom right);
* ``background``: white or black.

:func:`prompt_score` is the mean, over images, of the fraction of the four attributes of each image's prompt that
its pixels show. An image that shows a random other scene scores :data:`CHANCE` (0.3125: the mean of 1/6, 1/3,
1/4 and 1/2) in expectation; a perfect generator scores 1. Real scenes score 1 by construction (checked by the
tests for every rendered scene).

Rendering is numpy only (supersampled 4x, then box-filtered, so edges are anti-aliased) and deterministic given
the random generator, so the data set builds the same everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "CAPTION_TEMPLATES",
    "CHANCE",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "caption",
    "parse_caption",
    "prompt_score",
    "read_scene",
    "render",
    "sample_scene",
    "scene_captions",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (240, 240, 240), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = ("colour", "shape", "position", "background")
#: expected score of an image showing a random other scene: mean over attributes of 1 / (number of values)
CHANCE = float(np.mean([1 / len(COLOURS), 1 / len(SHAPES), 1 / len(POSITIONS), 1 / len(BACKGROUNDS)]))

CAPTION_TEMPLATES = (
    "a {colour} {shape} at the {position} on a {background} background",
    "a {background} background with a {colour} {shape} at the {position}",
)

_SUPERSAMPLE = 4
_MIN_OBJECT_FRACTION = 0.01  # below this share of the image no shape is read


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str
    cx: float  # centre, as a fraction of the width
    cy: float  # centre, as a fraction of the height
    size: float  # side of the bounding box, as a fraction of the image side

    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: uniform attributes, the centre jittered (2% of the side) around its quadrant's centre, the
    size 40-48% of the side (large enough that the shape carries a good share of a flow model's loss)."""
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    size = float(rng.uniform(0.40, 0.48))
    cx = (0.25 if "left" in position else 0.75) + float(rng.uniform(-0.02, 0.02))
    cy = (0.25 if "top" in position else 0.75) + float(rng.uniform(-0.02, 0.02))
    return Scene(colour, shape, position, background, cx, cy, size)


def _shape_mask(scene: Scene, side: int) -> np.ndarray:
    """Coverage in [0, 1] of each pixel of a ``side`` x ``side`` image (supersampled, then box-filtered)."""
    n = side * _SUPERSAMPLE
    c = (np.arange(n) + 0.5) / n
    y, x = np.meshgrid(c, c, indexing="ij")
    half = scene.size / 2
    dx, dy = x - scene.cx, y - scene.cy
    if scene.shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif scene.shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # an upright triangle whose base and height equal the size: half its bounding box
        t = (dy + half) / scene.size  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)
    return inside.reshape(side, _SUPERSAMPLE, side, _SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, side: int = 64) -> np.ndarray:
    """The scene as an ``(side, side, 3)`` uint8 RGB array."""
    if side < 8:
        raise ValueError(f"side must be >= 8, got {side}")
    cover = _shape_mask(scene, side)[..., None]
    fg = np.asarray(COLOURS[scene.colour], np.float64)
    bg = np.asarray(BACKGROUNDS[scene.background], np.float64)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def caption(scene: Scene, template: int = 0) -> str:
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)].format(**scene.attributes())


def scene_captions() -> list[str]:
    """Every caption a scene can have (for the tokenizer's corpus)."""
    out = []
    for t in CAPTION_TEMPLATES:
        for colour in COLOURS:
            for shape in SHAPES:
                for position in POSITIONS:
                    for background in BACKGROUNDS:
                        out.append(t.format(colour=colour, shape=shape, position=position, background=background))
    return out


_WORD = {
    "colour": "|".join(COLOURS),
    "shape": "|".join(SHAPES),
    "position": "|".join(POSITIONS),
    "background": "|".join(BACKGROUNDS),
}
_PATTERNS = [
    re.compile(re.sub(r"\\{(\w+)\\}", lambda m: f"(?P<{m.group(1)}>{_WORD[m.group(1)]})", re.escape(t)) + r"$")
    for t in CAPTION_TEMPLATES
]


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a scene caption names; raises ``ValueError`` for text that is not a scene caption."""
    for pat in _PATTERNS:
        m = pat.match(text.strip())
        if m:
            return m.groupdict()
    raise ValueError(f"not a scene caption: {text!r}")


def _nearest(colour: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    d = [float(np.sum((colour - np.asarray(table[n], np.float64)) ** 2)) for n in names]
    return names[int(np.argmin(d))]


def read_scene(image) -> dict[str, str | None]:
    """The attributes an image shows, read from its pixels (``None`` where no shape is found).

    ``image``: an ``(H, W, 3)`` uint8 array or a PIL image. The background is the nearest background colour to the
    median of the one-pixel border; the shape is every pixel farther from that median than a quarter of the
    distance between the two background colours. Its colour is the nearest palette colour to the shape's median
    pixel, its position the quadrant of its centroid, its kind the fraction of its bounding box it fills (below
    0.64: a triangle, below 0.89: a circle, else a square).
    """
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {arr.shape}")
    h, w = arr.shape[:2]
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg_colour = np.median(border, axis=0)
    out: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    out["background"] = _nearest(bg_colour, BACKGROUNDS)
    bgs = [np.asarray(v, np.float64) for v in BACKGROUNDS.values()]
    threshold = float(np.sqrt(np.sum((bgs[0] - bgs[1]) ** 2))) / 4
    mask = np.sqrt(np.sum((arr - bg_colour) ** 2, axis=-1)) > threshold
    if mask.sum() < _MIN_OBJECT_FRACTION * h * w:
        return out
    out["colour"] = _nearest(np.median(arr[mask], axis=0), COLOURS)
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.mean() + 0.5) / h, (xs.mean() + 0.5) / w
    out["position"] = ("top" if cy < 0.5 else "bottom") + " " + ("left" if cx < 0.5 else "right")
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    out["shape"] = "triangle" if fill < 0.64 else "circle" if fill < 0.89 else "square"
    return out


def prompt_score(images: Sequence, prompts: Sequence[str]) -> dict:
    """How well ``images`` follow their scene ``prompts``.

    Returns ``{"prompt_score", "chance", "exact", "per_attribute": {attr: accuracy}, "n"}``: ``prompt_score`` is the
    mean fraction of attributes right (in [0, 1]; :data:`CHANCE` for images of random other scenes), ``exact``
    the fraction of images with all four right.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    if not images:
        raise ValueError("prompt_score needs at least one image")
    hits = np.zeros((len(images), len(ATTRIBUTES)))
    for i, (img, p) in enumerate(zip(images, prompts)):
        want = parse_caption(p)
        got = read_scene(img)
        hits[i] = [got[a] == want[a] for a in ATTRIBUTES]
    return {
        "prompt_score": float(hits.mean()),
        "chance": CHANCE,
        "exact": float(hits.all(axis=1).mean()),
        "per_attribute": {a: float(hits[:, j].mean()) for j, a in enumerate(ATTRIBUTES)},
        "n": len(images),
    }
