"""An image-dependent reward for the image-policy tests (a random tiny model's format reward is always 0 and the
text rewards are the same for every image of a chain): the mean brightness of a chain's images in [0, 1]. Loaded
by file path, as a user's own reward would be; TRL's keyword contract, ``images`` a list of images per chain."""

import numpy as np


def brightness(prompts, completions, images, **kwargs):
    return [float(np.mean([np.asarray(im.convert("L"), dtype=np.float32).mean() / 255.0 for im in chain]))
            if chain else None for chain in images]
