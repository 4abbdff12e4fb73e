"""Procedural images of coloured shapes with captions ("a red circle"): data a tiny CLIP can learn in seconds."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "draw_shape", "shape_captions", "synthetic_shapes"]

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
    grey = rng.randint(200, 250)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    half = rng.uniform(0.22, 0.34) * size
    cx = rng.uniform(half + 1, size - half - 1)
    cy = rng.uniform(half + 1, size - half - 1)
    fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLORS[color])
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def synthetic_shapes(per_caption: int, seed: int = 0, size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """``per_caption`` images of every (colour, shape) pair and their captions, reproducible from ``seed``."""
    rng = random.Random(seed)
    images, captions = [], []
    for _ in range(per_caption):
        for color in COLORS:
            for shape in SHAPES:
                images.append(draw_shape(color, shape, rng, size))
                captions.append(f"a {color} {shape}")
    return images, captions
