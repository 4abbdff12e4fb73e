"""MindOmni's typed options (``model.options`` in a run config) and the prompts its release was trained with."""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are a helpful assistant. When the user requests an image, the assistant first thinks about the "
    "reasoning process in the mind and then provides the user with concise prompt as the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>."
)
INSTRUCTION_PREFIX = "Generate an image according to the following instructions\n"
NEGATIVE_PROMPT = (
    "low quality, jpeg artifacts, ugly, duplicate, morbid, mutilated, extra fingers, poorly drawn hands, "
    "poorly drawn face, deformed, blurry, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, "
    "gross proportions, malformed limbs, missing arms, missing legs, extra arms, extra legs, fused fingers, "
    "too many fingers, long neck"
)


@dataclass
class MindOmniOptions:
    system_prompt: str | None = None
    """System prompt of every chat; None: the checkpoint's own (its prompts.json), else MindOmni's, which the
    released model was trained with."""
    instruction_prefix: str | None = None
    """Text before the instruction in the user turn; None: the checkpoint's own, else MindOmni's ("Generate an
    image according to the following instructions\\n")."""
    negative_prompt: str | None = None
    """The guidance negative, run through the reference VLM without reasoning; None: the checkpoint's own, else
    MindOmni's."""
    decoder_kv_cache: bool = True
    """Reuse the condition tokens' keys and values across denoising steps (as MindOmni does). The image policy
    samples and replays without it whatever this says: the cached path differs by ~1e-5."""
    vae_batch_size: int = 4
    """Images per VAE decode call (the VAE runs in float32: large batches at 512 px cost memory)."""
    logprob_chunk_size: int = 512
    """Tokens per chunk of the norm + lm_head in the training forward: at most one chunk of full-vocabulary
    logits is alive at a time."""
    synced_generation: bool | None = None
    """Keep every rank stepping in chain sampling until all are done (ZeRO-3 needs it); None: on exactly when
    ZeRO-3 partitions the VLM on several ranks."""
