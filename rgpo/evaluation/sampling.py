"""One batch of reasoning chains and the image each draws, from a model outside training: the path ``rgpo sample``
and ``rgpo eval wise`` share.

Each prompt's initial noise comes from its own seed (``noise_seeds``), so a prompt's image does not depend on the
batch it was drawn in: a resumed evaluation draws what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from PIL import Image

from rgpo.models import Completions, ImageSamplingConfig, UnifiedModel


@torch.no_grad()
def sample_chains(model: UnifiedModel, rows: list[dict[str, Any]], *, max_new_tokens: int, temperature: float,
                  generator: torch.Generator | None, image: ImageSamplingConfig | None,
                  noise_seeds: list[int] | None = None) -> tuple[Completions, list[list[Image.Image]]]:
    """One chain per row (``{"prompt", "images"?, "messages"?}``, as :meth:`UnifiedModel.build_prompts` takes) and,
    when ``image`` is given, the one image each chain draws (deterministic sampler) from the noise of its seed in
    ``noise_seeds``. Returns the completions and a list of images per row (empty lists without ``image``)."""
    device = next(model.parameters()).device
    prompts = model.build_prompts(rows).to(device)
    completions = model.generate(prompts, num_generations=1, max_new_tokens=max_new_tokens, temperature=temperature,
                                 generator=generator)
    if image is None:
        return completions, [[] for _ in rows]
    if noise_seeds is None or len(noise_seeds) != len(rows):
        raise ValueError(f"sample_chains needs one noise seed per row ({len(rows)} rows, got {noise_seeds!r})")
    condition = model.forward_text(prompts, completions.to(device), with_condition=True).condition
    noise = torch.cat([model.initial_noise(1, 1, dataclasses.replace(image, seed=seed, shared_noise=False))
                       for seed in noise_seeds])
    return completions, [[im] for im in model.draw(condition, noise, image)]
