"""The work of each phase of an rgpo step, from the model's shapes: FLOPs and bytes read.

A phase's floor on a machine is its roofline time, ``max(FLOPs / peak FLOP/s, bytes / peak bandwidth)``, with the
peaks measured on that machine (:mod:`benchmarks.floor` runs the probes); ``time / floor`` says how far a phase is
from what the hardware allows. Pure functions of shapes and counts: no model, no timing.

Counting rules (matmuls only: norms, activations, rotary and softmax are a few FLOPs per element, far below the
matmuls at any size where the floor matters):

- a linear layer of ``W`` weights on ``n`` tokens: ``2 n W`` FLOPs, and its ``W`` weights read once per call;
- attention of ``q`` queries over ``k`` keys: ``4 q k H d`` FLOPs per layer (``QK^T`` and ``AV``, every key, as
  the kernels compute it under a mask; torch's FLOP counter counts it the same way);
- a transformer layer holds ``h H d`` (q) ``+ 2 h K d`` (k, v) ``+ H d h`` (o) ``+ 3 h I`` (gated MLP) weights for
  hidden size ``h``, ``H`` query heads and ``K`` key/value heads of size ``d``, MLP width ``I`` (biases left out);
- a decode step reads every weight of the language model and its head once (memory-bound: one token per chain),
  plus each chain's keys and values so far;
- backward: gradients with respect to inputs cost one forward's FLOPs again; gradients of trained weights cost
  another, so full fine-tuning is ``3x`` the forward and LoRA (frozen base weights, negligible adapters) ``2x``;
  gradient checkpointing recomputes the forward once more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TransformerShape:
    """A decoder-only stack: ``layers`` layers of hidden size ``hidden``, ``heads`` query heads and ``kv_heads``
    key/value heads of size ``head_dim``, gated-MLP width ``intermediate``; ``vocab`` rows of the output head (0:
    no head)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int = 0

    @property
    def layer_weights(self) -> int:
        h, d = self.hidden, self.head_dim
        return h * self.heads * d + 2 * h * self.kv_heads * d + self.heads * d * h + 3 * h * self.intermediate

    @property
    def body_weights(self) -> int:
        """Weights of every layer's matmuls (no head, no embeddings)."""
        return self.layers * self.layer_weights

    @property
    def head_weights(self) -> int:
        return self.hidden * self.vocab

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of one token's keys and values over every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def attention_flops(self, queries: int, keys: int) -> int:
        """``QK^T`` + ``AV`` of ``queries`` over ``keys`` in one sequence, every layer."""
        return 4 * self.layers * queries * keys * self.heads * self.head_dim

    def forward_flops(self, sequences: int, length: int, head_tokens: int = 0) -> int:
        """A forward of ``sequences`` x ``length`` tokens (full attention over the sequence), the head on
        ``head_tokens`` tokens in all."""
        tokens = sequences * length
        return (2 * tokens * self.body_weights + sequences * self.attention_flops(length, length)
                + 2 * head_tokens * self.head_weights)


@dataclass
class Work:
    """FLOPs and bytes read of one phase (``bytes`` 0: counted as compute-bound)."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)

    def scaled(self, factor: float) -> Work:
        return Work(self.flops * factor, self.bytes * factor)

    def floor_s(self, flops_per_s: float, bytes_per_s: float) -> float:
        """The roofline time: the larger of the compute and the memory time."""
        return max(self.flops / flops_per_s, self.bytes / bytes_per_s)

    def bound(self, flops_per_s: float, bytes_per_s: float) -> str:
        return "memory" if self.bytes / bytes_per_s > self.flops / flops_per_s else "compute"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# ================================================================================================ text
def decode_work(lm: TransformerShape, rows: int, prompt_len: int, new_tokens: int, dtype_bytes: int) -> Work:
    """The decode steps of ``rows`` chains after a prefill of ``prompt_len`` tokens: ``new_tokens - 1`` steps (the
    first token comes from the prefill's logits), step ``s`` (1-based) attending over ``prompt_len + s`` keys.
    Each step reads the body and head weights once and every chain's keys and values so far."""
    steps = max(new_tokens - 1, 0)
    weights = lm.body_weights + lm.head_weights
    # sum over s = 1..steps of (prompt_len + s) keys
    keys = steps * prompt_len + steps * (steps + 1) // 2
    flops = 2 * rows * steps * weights + rows * lm.attention_flops(1, 1) * keys
    bytes_read = steps * weights * dtype_bytes + rows * keys * lm.kv_bytes_per_token(dtype_bytes)
    return Work(flops, bytes_read)


def prefill_work(lm: TransformerShape, prompts: int, prompt_len: int, dtype_bytes: int) -> Work:
    """One forward of the prompts (each prefilled once for its G chains), the head on each prompt's last token."""
    flops = lm.forward_flops(prompts, prompt_len, head_tokens=prompts)
    return Work(flops, (lm.body_weights + lm.head_weights) * dtype_bytes)


def text_forward_work(lm: TransformerShape, chains: int, prompt_len: int, completion_len: int,
                      dtype_bytes: int) -> Work:
    """One training-layout forward over prompt + completion (the rollout's policy or reference forward), the head
    on the completion tokens (their log-probs)."""
    flops = lm.forward_flops(chains, prompt_len + completion_len, head_tokens=chains * completion_len)
    return Work(flops, (lm.body_weights + lm.head_weights) * dtype_bytes)


def backward_factor(full: bool, checkpointing: bool) -> float:
    """FLOPs of forward + backward in forwards: 3 with every weight trained, 2 with frozen weights (LoRA), +1 with
    gradient checkpointing."""
    return (3.0 if full else 2.0) + (1.0 if checkpointing else 0.0)


# ================================================================================================ images
@dataclass(frozen=True)
class ImageShape:
    """The generator side: the connector (``proj_in`` -> ``connector``'s layers) and the denoiser transformer over
    ``[condition | time | image]`` tokens, ``patch_weights`` (patch embedding + output projection) per image
    token, and the measured VAE-decode FLOPs of one image."""

    decoder: TransformerShape
    connector: TransformerShape
    proj_in: int  # weights of the projection VLM hidden -> decoder hidden
    patch_weights: int
    vae_flops_per_image: float = 0.0
    vae_weights: int = 0


def sampling_work(img: ImageShape, images: int, cond_len: int, image_tokens: int, steps: int, guided: bool,
                  kv_cache: bool, dtype_bytes: int) -> Work:
    """Drawing ``images`` images of ``image_tokens`` tokens each with ``steps`` denoiser steps from conditions of
    ``cond_len`` tokens: the connector once per condition row (negative rows too when ``guided``), then per step
    the denoiser on ``2x`` rows when ``guided``. With the condition KV cache the condition tokens run once per
    image and each step runs the time and image tokens over all keys; without it each step runs the whole
    sequence. Then the VAE decode of every image."""
    dec, rows = img.decoder, images * (2 if guided else 1)
    n = 1 + image_tokens  # time token + image tokens
    seq = cond_len + n
    connector = img.connector.forward_flops(rows, cond_len) + 2 * rows * cond_len * img.proj_in
    if kv_cache:
        cache = dec.forward_flops(rows, cond_len)
        per_step = 2 * rows * n * dec.body_weights + rows * dec.attention_flops(n, seq)
        denoise = cache + steps * per_step
    else:
        denoise = steps * dec.forward_flops(rows, seq)
    patches = steps * 2 * rows * image_tokens * img.patch_weights
    flops = connector + denoise + patches + images * img.vae_flops_per_image
    bytes_read = ((img.connector.body_weights + img.proj_in) + steps * (dec.body_weights + img.patch_weights)
                  + img.vae_weights) * dtype_bytes
    return Work(flops, bytes_read)


def regularizer_work(img: ImageShape, chains: int, timesteps: int, cond_len: int, image_tokens: int,
                     generator_trained: bool, checkpointing: bool, dtype_bytes: int) -> Work:
    """The image regulariser of the update (feature KL / velocity MSE): per chain and drawn timestep, one
    unguided denoiser forward on the policy's condition with its backward (into the condition, and the
    generator's weights when trained), and one no-grad forward on the reference's; the connector likewise."""
    rows = chains * timesteps
    seq = cond_len + 1 + image_tokens
    one = (img.decoder.forward_flops(rows, seq) + img.connector.forward_flops(rows, cond_len)
           + 2 * rows * cond_len * img.proj_in + 2 * rows * image_tokens * img.patch_weights)
    factor = backward_factor(generator_trained, checkpointing) + 1.0  # + the reference's forward
    weights = img.decoder.body_weights + img.connector.body_weights + img.proj_in + img.patch_weights
    return Work(one * factor, weights * dtype_bytes * factor)


def update_work(lm: TransformerShape, chains: int, prompt_len: int, completion_len: int, dtype_bytes: int, *,
                full: bool, checkpointing: bool, micro_batches: int, regularizer: Work | None = None) -> Work:
    """The update: the policy's forward + backward over every chain (weights read once per pass and micro-batch),
    plus the image regulariser's work."""
    factor = backward_factor(full, checkpointing)
    fwd = text_forward_work(lm, chains, prompt_len, completion_len, dtype_bytes)
    work = Work(fwd.flops * factor, fwd.bytes * factor * micro_batches)
    return work + regularizer if regularizer is not None else work
