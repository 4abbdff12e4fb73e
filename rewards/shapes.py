"""Procedural images of coloured shapes with captions ("a red circle"): data a tiny CLIP can learn in seconds."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "draw_shape", "paint_shape", "shape_captions", "synthetic_shapes"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


def shape_captions() -> list[str]:
    """Every caption, colour-major: "a red circle", "a red square", ..."""
    return [f"a {color} {shape}" for color in COLORS for shape in SHAPES]


def draw_shape(color: str, shape: str, rng: random.Random, size: int = 64) -> Image.Image:
    """One ``size`` x ``size`` RGB image: the shape, jittered in position, size and tint, on a light background."""
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"color must be one of {list(COLORS)} and shape one of {list(SHAPES)}; got {color!r}, {shape!r}")
    return paint_shape(COLORS[color], shape, rng, size)


def paint_shape(
    rgb: tuple[int, int, int],
    shape: str,
    rng: random.Random,
    size: int,
    *,
    grey: tuple[int, int] = (200, 250),
    scale: tuple[float, float] = (0.22, 0.34),
    tint: int = 20,
) -> Image.Image:
    """A circle, square or triangle of colour ``rgb`` (each channel jittered by up to ``tint``), half-width a
    ``scale`` fraction of ``size``, anywhere it fits, on a background grey drawn from ``grey``."""
    level = rng.randint(*grey)
    image = Image.new("RGB", (size, size), (level, level, level))
    draw = ImageDraw.Draw(image)
    half = rng.uniform(*scale) * size
    cx = rng.uniform(half + 1, size - half - 1)
    cy = rng.uniform(half + 1, size - half - 1)
    fill = tuple(min(255, max(0, v + rng.randint(-tint, tint))) for v in rgb)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    else:
        raise ValueError(f"shape must be circle, square or triangle; got {shape!r}")
    return image


def picture_grid(
    per_pair: int,
    seed: int,
    colours: Sequence[str],
    shapes: Sequence[str],
    draw: Callable[[str, str, random.Random], Image.Image],
    caption: Callable[[str, str], str],
) -> tuple[list[Image.Image], list[str]]:
    """``per_pair`` pictures of every (colour, shape) pair, drawn from one RNG seeded with ``seed`` in a fixed
    order (so reproducible), and their captions."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(per_pair):
        for colour in colours:
            for shape in shapes:
                images.append(draw(colour, shape, rng))
                captions.append(caption(colour, shape))
    return images, captions


def synthetic_shapes(per_caption: int, seed: int = 0, size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """``per_caption`` images of every (colour, shape) pair and their captions, reproducible from ``seed``."""
    return picture_grid(per_caption, seed, COLORS, SHAPES, lambda c, s, rng: draw_shape(c, s, rng, size),
                        lambda c, s: f"a {c} {s}")
