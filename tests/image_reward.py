"""An image-dependent reward for the image-policy tests (a random tiny model's format reward is always 0 and the
text rewards are the same for every image of a chain): the mean brightness of a chain's images in [0, 1]. Loaded
by file path, as a user's own reward would be; TRL's keyword contract, ``images`` a list of images per chain."""

import numpy as np


def brightness(prompts, completions, images, **kwargs):
    return [float(np.mean([np.asarray(im.convert("L"), dtype=np.float32).mean() / 255.0 for im in chain]))
            if chain else None for chain in images]


def left_brighter(prompts, completions, images, **kwargs):
    """How much brighter the left half of a chain's images is than the right half, in [-1, 1]: a spatial
    pattern, which a random tiny decoder passes through far better than the overall brightness (its last
    GroupNorm leaves every image's mean brightness nearly the same, whatever the latents)."""
    def one(image):
        gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        half = gray.shape[1] // 2
        return float(gray[:, :half].mean() - gray[:, gray.shape[1] - half:].mean())

    return [float(np.mean([one(im) for im in chain])) if chain else None for chain in images]
