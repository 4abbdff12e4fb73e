"""MM-Interleaved's typed options (``model.options`` in a run config) and the prompt rgpo gives it."""

from __future__ import annotations

from dataclasses import dataclass

# Vicuna v1.3's conversation format (the LLM MM-Interleaved was built on), asking for reasoning before drawing.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. When the user asks for an image, the "
    "assistant first thinks about the reasoning process and then gives a concise caption as the answer, then draws "
    "it. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>."
)


@dataclass
class MMInterleavedOptions:
    system_prompt: str | None = None
    """Text before the first turn; None: rgpo's reasoning prompt in Vicuna's chat format."""
    max_images: int = 1
    """K, the images one chain may hold when its rollout is interleaved (each soi the chain emits draws one, the
    text continues seeing it; after K, soi is no longer sampled). Without an interleaved draw a chain ends at its
    first soi, and its one image is drawn afterwards from that soi's condition."""
    sampler: str = "ddpm"
    """The image sampler: "ddpm" (the release's ancestral DDPMScheduler; stochastic at every step) or "ddim"
    (DDIMScheduler on the same betas; ``ddim_eta`` when stochastic, eta 0 when deterministic)."""
    ddim_eta: float = 1.0
    """eta of the stochastic DDIM steps (sampler "ddim"), in (0, 1]."""
    logprob_chunk_size: int = 512
    """Tokens per chunk of the text head in the training forward: at most one chunk of full-vocabulary logits is
    alive at a time."""

    def __post_init__(self):
        if self.max_images < 1:
            raise ValueError(f"model.options.max_images must be >= 1, got {self.max_images}")
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"model.options.sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        if not 0 < self.ddim_eta <= 1:
            raise ValueError(f"model.options.ddim_eta must be in (0, 1], got {self.ddim_eta}")
        if self.logprob_chunk_size < 1:
            raise ValueError(f"model.options.logprob_chunk_size must be >= 1, got {self.logprob_chunk_size}")
