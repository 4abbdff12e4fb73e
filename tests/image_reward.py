"""An image-dependent reward for the image-policy tests (a random tiny model's format reward is always 0 and the
text rewards are the same for every image of a chain): the mean brightness of the image in [0, 1]. Loaded by
file path, as a user's own reward would be."""

import numpy as np


def brightness(prompts, completions, images, **columns):
    return [float(np.asarray(im.convert("L"), dtype=np.float32).mean() / 255.0) for im in images]
