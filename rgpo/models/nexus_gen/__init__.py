"""Nexus-Gen (modelscope): Qwen2.5-VL + 81 prefilled image positions -> adapter -> FLUX.1-dev -> FLUX AE, behind rgpo's
interface.

- :mod:`.modeling`: the model (chains that end at BOI, the training forward with the prefill condition, the FLUX
  image pipeline with the release's sigmas, CFG and embedded guidance);
- :mod:`.checkpoint`: the released layout in and out, and the DiffSynth / BFL key mappings;
- :mod:`.options`: typed options and the release's prompts; :mod:`.tiny`: tiny and random-shape factories.
"""

from .modeling import (
    BOI,
    NUM_IMAGE_TOKENS,
    FluxInputs,
    NexusGen,
    Prefill,
    build_adapter,
    image_position_ids,
    pack_latents,
    release_sigmas,
    suffix_attention,
    unpack_latents,
)
from .options import INSTRUCTION_TEMPLATE, RELEASE_SYSTEM_PROMPT, SYSTEM_PROMPT, NexusGenOptions

__all__ = [
    "BOI",
    "INSTRUCTION_TEMPLATE",
    "NUM_IMAGE_TOKENS",
    "RELEASE_SYSTEM_PROMPT",
    "SYSTEM_PROMPT",
    "FluxInputs",
    "NexusGen",
    "NexusGenOptions",
    "Prefill",
    "build_adapter",
    "image_position_ids",
    "pack_latents",
    "release_sigmas",
    "suffix_attention",
    "unpack_latents",
]
