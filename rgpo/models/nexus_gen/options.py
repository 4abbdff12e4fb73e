"""Nexus-Gen's typed options (``model.options`` in a run config) and the prompts its release uses."""

from __future__ import annotations

from dataclasses import dataclass

# The release's generation prompt (image_generation.py, EN_TEMPLATE) and Qwen2.5-VL's default system prompt, which
# its chat template inserts when the conversation has none (the release sends a user turn only).
INSTRUCTION_TEMPLATE = "Generate an image according to the following description: {}"
RELEASE_SYSTEM_PROMPT = "You are a helpful assistant."
# rgpo's default: ask for a chain first. The release was trained on a fixed lead-in before BOI ("Here is an image
# based on the description: "), so reasoning before the image is what RL teaches.
SYSTEM_PROMPT = (
    "You are a helpful assistant. When the user requests an image, the assistant first thinks about the "
    "reasoning process in the mind and then provides the user with a concise prompt as the answer, then draws "
    "the image. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>."
)


@dataclass
class NexusGenOptions:
    flux_path: str | None = None
    """The FLUX.1-dev folder (``text_encoder/``, ``text_encoder_2/``, ``ae.safetensors``); None: ``<model.path>/FLUX/
    FLUX.1-dev`` (what ``rgpo export`` writes) if it exists, else ``<model.path>/../FLUX/FLUX.1-dev`` (the release's
    ``models/`` folder: ``models/Nexus-GenV2`` next to ``models/FLUX/FLUX.1-dev``)."""
    system_prompt: str | None = None
    """System prompt of every chat; None: rgpo's reasoning prompt. ``"You are a helpful assistant."`` is what the
    release's chats carry (Qwen's default)."""
    instruction_template: str | None = None
    """The user turn, with ``{}`` for the instruction; None: the release's "Generate an image according to the
    following description: {}"."""
    embedded_guidance: float = 3.5
    """FLUX.1-dev's distilled guidance fed to its guidance embedder (the release's 3.5); true CFG is
    ``rollout.image.guidance_scale`` (the release's 3.0)."""
    vae_batch_size: int = 4
    """Images per AE decode call (the AE runs in float32)."""
    logprob_chunk_size: int = 512
    """Tokens per chunk of the lm_head in the training forward: at most one chunk of full-vocabulary logits lives."""
    synced_generation: bool | None = None
    """Keep every rank stepping in chain sampling until all are done (ZeRO-3 needs it); None: on exactly when
    ZeRO-3 partitions the VLM on several ranks."""
