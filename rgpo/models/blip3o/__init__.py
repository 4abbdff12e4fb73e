"""BLIP3-o (Salesforce): Qwen2.5-VL -> 64 queries -> Lumina-Next DiT (CLIP features) -> SDXL UNet -> VAE.

- :mod:`.modeling`: the model (chains ending at ``[IMG]``, the training forward with the query condition, the DiT
  flow and the renderer stage); :mod:`.dit`: the DiT at the release's widths;
- :mod:`.checkpoint`: the released layout in and out; :mod:`.options`: typed options and the release's prompts;
- :mod:`.tiny`: tiny and random-shape factories, and the tiny writer of the released layout.
"""

from .dit import RELEASE_DIT, Blip3oDiT
from .modeling import (
    ADDED_TOKENS,
    NUM_QUERIES,
    Blip3o,
    DiTInputs,
    LatentQueries,
    clip_tokens,
    condition_attention,
)
from .options import INSTRUCTION_PREFIX, RELEASE_SYSTEM_PROMPT, SYSTEM_PROMPT, Blip3oOptions

__all__ = [
    "ADDED_TOKENS",
    "INSTRUCTION_PREFIX",
    "NUM_QUERIES",
    "RELEASE_DIT",
    "RELEASE_SYSTEM_PROMPT",
    "SYSTEM_PROMPT",
    "Blip3o",
    "Blip3oDiT",
    "Blip3oOptions",
    "DiTInputs",
    "LatentQueries",
    "clip_tokens",
    "condition_attention",
]
