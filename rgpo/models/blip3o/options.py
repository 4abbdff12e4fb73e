"""BLIP3-o's typed options (``model.options`` in a run config) and the prompts its release was used with."""

from __future__ import annotations

from dataclasses import dataclass

# The release's chat (``conv_templates["qwen"]``): this system prompt and this lead-in before the caption.
RELEASE_SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION_PREFIX = "Please generate image based on the following caption: "
# rgpo's default: the release's model never reasons (it was trained on captions); RL teaches it to, from this ask.
SYSTEM_PROMPT = (
    "You are a helpful assistant. When the user requests an image, the assistant first thinks about the "
    "reasoning process in the mind and then provides the user with a concise caption as the answer, then draws "
    "it. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>."
)
# The prompt whose DiT features are the renderer's guidance negative (the release's pipeline encodes it raw).
RENDERER_NEGATIVE_PROMPT = " "


@dataclass
class Blip3oOptions:
    system_prompt: str | None = None
    """System prompt of every chat; None: rgpo's reasoning prompt (think, answer, then draw). The release's own
    is "You are a helpful assistant."."""
    instruction_prefix: str | None = None
    """Text before the instruction in the user turn; None: the release's "Please generate image based on the
    following caption: "."""
    dit_shift: float | None = None
    """Override of the DiT scheduler's ``shift``; None: the scheduler config's (Lumina-Next-SFT's, 1.0)."""
    renderer_steps: int | None = None
    """Euler steps of the diffusion-decoder UNet for every image drawn outside :meth:`Blip3o.rollout_rendering`
    (evaluation, ``rgpo sample``); None: the checkpoint's own, the release's 50 (rgpo's tiny model: 4)."""
    rollout_renderer_steps: int | None = None
    """UNet steps for rollout images (inside :meth:`Blip3o.rollout_rendering`); None: as ``renderer_steps``. The
    UNet is a fixed renderer whose steps cost more than the DiT's (50 x a 2.6 B UNet at 128 x 128 latents against
    30 x a 1.4 B DiT on 64 tokens): 20-25 keeps rewards close at a third of the cost."""
    renderer_guidance_scale: float = 3.0
    """Guidance of the UNet stage against the DiT's features for the prompt " " (the release's 3.0)."""
    renderer_seed: int = 0
    """Seed of the UNet stage's initial noise: every image gets the same draw (the renderer is fixed; what differs
    between images is the DiT's features), so a row's pixels do not depend on its batch."""
    negative_seed: int = 0
    """Seed of the DiT noise that samples the renderer's negative features (the release draws it from the global
    RNG each call; rgpo samples it once, as the reference, and caches it)."""
    vae_batch_size: int = 4
    """Images per UNet + VAE call (both run at the output size: large batches at 1024 px cost memory)."""
    logprob_chunk_size: int = 512
    """Tokens per chunk of the lm_head in the training forward: at most one chunk of full-vocabulary logits is
    alive at a time."""
    synced_generation: bool | None = None
    """Keep every rank stepping in chain sampling until all are done (ZeRO-3 needs it); None: on exactly when
    ZeRO-3 partitions the language model on several ranks."""

    def __post_init__(self):
        for key in ("vae_batch_size", "logprob_chunk_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.options.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("renderer_steps", "rollout_renderer_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"model.options.{key} must be >= 1 or null, got {getattr(self, key)}")
